//! Job metadata, as on OpenAI's fine-tuning jobs: the limits of a job's pairs, and the
//! `metadata[key]=value` filter of the job list.

use crate::error::{ApiError, ApiResult};
use std::collections::BTreeMap;

/// Most pairs of a job's `metadata`, and the longest key and value, in characters (OpenAI's
/// limits for the same field).
const METADATA_PAIRS: usize = 16;
const METADATA_KEY_CHARS: usize = 64;
const METADATA_VALUE_CHARS: usize = 512;

/// Checks a job's metadata pairs against the limits.
pub fn check_metadata(pairs: &BTreeMap<String, String>) -> ApiResult<()> {
    if pairs.len() > METADATA_PAIRS {
        return Err(ApiError::invalid("metadata", format!("metadata holds at most {METADATA_PAIRS} pairs, not {}", pairs.len())));
    }
    for (key, value) in pairs {
        if key.is_empty() || key.chars().count() > METADATA_KEY_CHARS {
            return Err(ApiError::invalid("metadata", format!("metadata keys are 1 to {METADATA_KEY_CHARS} characters: {key:?} is not")));
        }
        if value.chars().count() > METADATA_VALUE_CHARS {
            return Err(ApiError::invalid(
                format!("metadata.{key}"),
                format!("metadata values are at most {METADATA_VALUE_CHARS} characters"),
            ));
        }
    }
    Ok(())
}

/// `metadata[key]=value` pairs of a list query, and the query without them.
pub fn filter_of(query: &str) -> (Vec<(String, String)>, String) {
    let (mut pairs, mut rest) = (Vec::new(), form_urlencoded::Serializer::new(String::new()));
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        match name.strip_prefix("metadata[").and_then(|k| k.strip_suffix(']')) {
            Some(key) => pairs.push((key.to_string(), value.into_owned())),
            None => drop(rest.append_pair(&name, &value)),
        }
    }
    (pairs, rest.finish())
}

/// Checks a list filter: the count and the values have the limits of a job's metadata; a key
/// no job can have (an empty one, say) matches none.
pub fn check_filter(pairs: &[(String, String)]) -> ApiResult<()> {
    if pairs.len() > METADATA_PAIRS {
        return Err(ApiError::invalid("metadata", format!("a list filters by at most {METADATA_PAIRS} metadata pairs")));
    }
    if let Some((key, _)) = pairs.iter().find(|(_, v)| v.chars().count() > METADATA_VALUE_CHARS) {
        return Err(ApiError::invalid(format!("metadata.{key}"), format!("metadata values are at most {METADATA_VALUE_CHARS} characters")));
    }
    Ok(())
}
