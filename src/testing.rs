//! The one way a test says it skipped: [`skip`]. Under CI a skip is a failure unless its id is on
//! the short list `.ci/run` exports, so a check cannot stop running there without anyone noticing.

/// The environment variable holding the ids of the skips CI allows, separated by commas.
pub const ALLOWED_SKIPS: &str = "FINETUNED_ALLOWED_SKIPS";

/// Says that the test `id` skipped (`skipped <id>: <reason>` on stderr), so that the caller can
/// return. Under CI (`CI` set to `true` or `1`) it panics instead, unless `id` is one of the ids
/// in `FINETUNED_ALLOWED_SKIPS`.
pub fn skip(id: &str, reason: impl std::fmt::Display) {
    eprintln!("skipped {id}: {reason}");
    let (ci, allowed) = (std::env::var("CI").ok(), std::env::var(ALLOWED_SKIPS).ok());
    if fails_under(ci.as_deref(), allowed.as_deref(), id) {
        panic!(
            "test {id} skipped under CI ({reason}): a skip fails there unless its id is in {ALLOWED_SKIPS} \
             (comma-separated; .ci/run sets it and prints each allowed id with its reason)"
        );
    }
}

/// Whether a skip of `id` fails, given the values of `CI` and of [`ALLOWED_SKIPS`].
fn fails_under(ci: Option<&str>, allowed: Option<&str>, id: &str) -> bool {
    let under_ci = ci.map(str::trim).is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    under_ci && !allowed.unwrap_or("").split(',').any(|a| a.trim() == id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skip_fails_under_ci_unless_its_id_is_allowed() {
        for ci in [None, Some(""), Some("false"), Some("0")] {
            assert!(!fails_under(ci, None, "a"), "CI={ci:?}");
        }
        for ci in ["true", "TRUE", "1"] {
            assert!(fails_under(Some(ci), None, "a"), "CI={ci}");
            assert!(fails_under(Some(ci), Some(""), "a"));
            assert!(fails_under(Some(ci), Some("ab,b"), "a"), "a whole id, not a prefix");
            assert!(!fails_under(Some(ci), Some("b, a"), "a"));
            assert!(!fails_under(Some(ci), Some("a"), "a"));
        }
    }

    #[test]
    fn skip_panics_under_ci_with_how_to_allow_it() {
        // The variables are read, not set, here: tests run in parallel threads of one process.
        let under_ci = fails_under(std::env::var("CI").ok().as_deref(), std::env::var(ALLOWED_SKIPS).ok().as_deref(), "testing-self");
        let r = std::panic::catch_unwind(|| skip("testing-self", "checking the skip itself"));
        assert_eq!(r.is_err(), under_ci);
        if let Err(e) = r {
            let msg = e.downcast_ref::<String>().unwrap();
            assert!(msg.contains("testing-self") && msg.contains(ALLOWED_SKIPS), "{msg}");
        }
    }
}
