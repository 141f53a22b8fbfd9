//! The Hugging Face inference API's text-classification `parameters`, accepted by
//! `POST /v1/models/{id}/predict` and TEI's `POST /predict`.

use crate::error::{ApiError, ApiResult};
use serde::Deserialize;
use serde_json::Value;

/// `parameters` of a Hugging Face inference API text-classification request (what
/// `huggingface_hub`'s `InferenceClient.text_classification` sends, even when empty). A body
/// that has it is answered in that API's shape: a list of `{label, score}` lists, one per input.
/// Our own clients never send it (it was an unknown field before), so their answers keep the
/// contract's shape.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HfParameters {
    pub(crate) top_k: Option<u64>,
    function_to_apply: Option<String>,
    /// Token classification: how sub-words become entities.
    pub(crate) aggregation_strategy: Option<String>,
    /// Token classification: entity types left out (besides `O`).
    pub(crate) ignore_labels: Option<Vec<String>>,
    /// Token classification: the pipeline's window overlap. Accepted for its clients; our
    /// windows overlap by half a window whatever it says.
    #[allow(dead_code)]
    stride: Option<u64>,
}

/// `parameters` as a JSON object only (serde would also take a struct as an array of its fields).
pub(crate) fn hf_parameters<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<HfParameters>, D::Error> {
    let object = Option::<serde_json::Map<String, Value>>::deserialize(d)?;
    object.map(|o| serde_json::from_value(Value::Object(o)).map_err(serde::de::Error::custom)).transpose()
}

impl HfParameters {
    /// `function_to_apply`, checked, and `top_k`, checked (a missing one is every label).
    pub(crate) fn checked(&self) -> ApiResult<(Function, usize)> {
        if let Some(s) = &self.aggregation_strategy {
            crate::serve::entities::Aggregation::parse(s).ok_or_else(|| {
                ApiError::invalid("parameters.aggregation_strategy", "aggregation_strategy must be none, simple, first, average or max")
            })?;
        }
        check_top_k("parameters.top_k", self.top_k)?;
        let f = self.function_to_apply.as_deref().map(Function::parse).transpose()?.unwrap_or(Function::Default);
        Ok((f, self.top_k.map_or(usize::MAX, |k| k as usize)))
    }
}

/// Refuses a `top_k` outside the documented 1 to 2147483647.
pub(crate) fn check_top_k(param: &str, top_k: Option<u64>) -> ApiResult<()> {
    match top_k {
        Some(k) if !(1..=i32::MAX as u64).contains(&k) => Err(ApiError::invalid(param, "top_k must be from 1 to 2147483647")),
        _ => Ok(()),
    }
}

/// What turns logits into scores, as transformers' pipeline names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Function {
    /// The model's own: softmax, or sigmoid for a multi-label model.
    Default,
    Softmax,
    Sigmoid,
    /// The logits themselves.
    None,
}

impl Function {
    fn parse(s: &str) -> ApiResult<Self> {
        match s.to_ascii_lowercase().as_str() {
            "softmax" => Ok(Self::Softmax),
            "sigmoid" => Ok(Self::Sigmoid),
            "none" => Ok(Self::None),
            _ => Err(ApiError::invalid("parameters.function_to_apply", "function_to_apply must be \"softmax\", \"sigmoid\" or \"none\"")),
        }
    }

    /// Whether the model must be asked for raw logits (then [`Function::apply`] them).
    pub(crate) fn needs_logits(self) -> bool {
        !matches!(self, Self::Default)
    }

    /// Applies the function to each row of logits (rows from a model asked for raw scores).
    pub(crate) fn apply(self, rows: &mut [Vec<f32>]) {
        for row in rows {
            match self {
                Self::Softmax => *row = crate::model::predict::predictor::softmax(row),
                Self::Sigmoid => row.iter_mut().for_each(|x| *x = 1.0 / (1.0 + (-*x).exp())),
                Self::Default | Self::None => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn functions_apply_to_logits_as_transformers_pipeline_does() {
        let logits = vec![vec![2.0f32, 0.0]];
        let mut soft = logits.clone();
        Function::parse("Softmax").unwrap().apply(&mut soft);
        assert!((soft[0][0] - 1.0 / (1.0 + (-2f32).exp())).abs() < 1e-6 && (soft[0].iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let mut sig = logits.clone();
        Function::parse("sigmoid").unwrap().apply(&mut sig);
        assert_eq!(sig[0][1], 0.5);
        let mut none = logits.clone();
        Function::parse("none").unwrap().apply(&mut none);
        assert_eq!(none, logits);
        assert!(Function::parse("tanh").is_err());
    }

    #[test]
    fn parameters_are_an_object_or_null() {
        #[derive(Deserialize)]
        struct Body {
            #[serde(default, deserialize_with = "hf_parameters")]
            parameters: Option<HfParameters>,
        }
        let parse = |s: &str| serde_json::from_str::<Body>(s).map(|b| b.parameters.is_some());
        assert!(parse(r#"{"parameters": {}}"#).unwrap());
        assert!(!parse(r#"{"parameters": null}"#).unwrap());
        assert!(!parse("{}").unwrap());
        assert!(parse(r#"{"parameters": [null, null]}"#).is_err());
        assert!(parse(r#"{"parameters": {"temperature": 1}}"#).is_err());
    }
}
