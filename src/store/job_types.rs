//! A job's status and task: Rust enums everywhere, text only in SQL and JSON (the same words
//! the API has always used).

use serde::{Deserialize, Serialize};

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    /// Every status, in the order a job goes through them.
    pub const ALL: [JobStatus; 5] = [JobStatus::Queued, JobStatus::Running, JobStatus::Succeeded, JobStatus::Failed, JobStatus::Cancelled];

    /// The status as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    /// The status named `s`, if any.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// Whether the job has ended (nothing about it changes any more).
    pub fn has_ended(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled)
    }
}

/// What a job trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobTask {
    /// One label per text (softmax).
    Classification,
    /// Any number of labels per text (sigmoid per label).
    MultiLabelClassification,
    /// A number per text or pair (one output, mean squared error).
    Regression,
    /// A cross-encoder reranker: a relevance per (query, document) pair (one output, sigmoid).
    Rerank,
    /// A tag per word (named entities).
    TokenClassification,
    /// Masked-language-model pre-training: the result is a base model.
    Mlm,
}

impl JobTask {
    /// Every task, as the API lists them.
    pub const ALL: [JobTask; 6] = [
        JobTask::Classification,
        JobTask::MultiLabelClassification,
        JobTask::Regression,
        JobTask::Rerank,
        JobTask::TokenClassification,
        JobTask::Mlm,
    ];

    /// The task as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            JobTask::Classification => "classification",
            JobTask::MultiLabelClassification => "multi_label_classification",
            JobTask::Regression => "regression",
            JobTask::Rerank => "rerank",
            JobTask::TokenClassification => "token_classification",
            JobTask::Mlm => "mlm",
        }
    }

    /// The task named `s`, if any.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

macro_rules! text_enum {
    ($t:ty, $what:literal) => {
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        // How a column of SQL text becomes the enum (`#[sqlx(try_from = "String")]`).
        impl TryFrom<String> for $t {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                Self::parse(&s).ok_or_else(|| format!(concat!("unknown job ", $what, " {:?} in the database"), s))
            }
        }
    };
}

text_enum!(JobStatus, "status");
text_enum!(JobTask, "task");

/// Reads a text column as `T` (a status or task), failing the row on an unknown word.
pub(crate) fn column<T: TryFrom<String, Error = String>>(row: &sqlx::any::AnyRow, name: &str) -> sqlx::Result<T> {
    use sqlx::Row;
    let text: String = row.try_get(name)?;
    T::try_from(text).map_err(|e| sqlx::Error::ColumnDecode { index: name.into(), source: e.into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_tasks_keep_their_wire_words() {
        for s in JobStatus::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
            assert_eq!(JobStatus::parse(s.as_str()), Some(s));
        }
        for t in JobTask::ALL {
            assert_eq!(serde_json::to_value(t).unwrap(), t.as_str());
            assert_eq!(JobTask::parse(t.as_str()), Some(t));
        }
        assert_eq!(JobTask::MultiLabelClassification.to_string(), "multi_label_classification");
        assert!(JobStatus::parse("done").is_none());
    }
}
