//! Names a client chooses (tables, checkpoints, jobs): what is accepted, and
//! how a refused one is quoted back without echoing whatever it was sent.
//!
//! A checkpoint name becomes a folder under `--checkpoint-dir`, so besides
//! the character set it must not be a path of its own: `.` and `..` (and any
//! name starting with a dot, which would also hide the folder) are refused.

use crate::error::PsError;

/// Longest table or checkpoint name, in bytes.
pub const MAX_NAME_BYTES: usize = 128;

/// How much of a refused name an error message quotes.
const QUOTED_BYTES: usize = 40;

/// `name` for an error message: debug-quoted, cut to its first
/// [`QUOTED_BYTES`] characters with its length when it is longer, so a
/// 10 KB name is not echoed in full.
pub fn quoted(name: &str) -> String {
    if name.len() <= QUOTED_BYTES {
        return format!("{name:?}");
    }
    let mut end = QUOTED_BYTES;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}... ({} bytes)", &name[..end], name.len())
}

fn is_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Checks a table name: 1-128 characters from `[A-Za-z0-9_.-]`.
pub fn validate_table_name(name: &str) -> Result<(), PsError> {
    if is_name(name) {
        Ok(())
    } else {
        Err(PsError::invalid(format!(
            "table name {} must be 1-128 characters from [A-Za-z0-9_.-]",
            quoted(name)
        )))
    }
}

/// The rule a checkpoint name follows, for messages that name a flag or key.
pub const CHECKPOINT_NAME_RULE: &str =
    "must be 1-128 characters from [A-Za-z0-9_.-], not starting with '.'";

/// Checks a checkpoint name: a table name that does not start with `.`
/// (so neither `.` nor `..`: the name is a folder under the checkpoint root).
pub fn validate_checkpoint_name(name: &str) -> Result<(), PsError> {
    if is_name(name) && !name.starts_with('.') {
        Ok(())
    } else {
        Err(PsError::invalid(format!(
            "checkpoint name {} {CHECKPOINT_NAME_RULE}",
            quoted(name)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dots_alone_or_leading_are_not_checkpoint_names() {
        for bad in [".", "..", ".hidden", "", "a/b", "../x", "a b"] {
            assert!(validate_checkpoint_name(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["periodic", "best.v2", "epoch-3", "a..b", "x."] {
            assert!(validate_checkpoint_name(good).is_ok(), "{good:?} refused");
        }
        assert!(validate_checkpoint_name(&"c".repeat(129)).is_err());
    }

    #[test]
    fn a_long_refused_name_is_quoted_short_with_its_length() {
        let name = "x/".repeat(5_000);
        let err = validate_table_name(&name).unwrap_err().to_string();
        assert!(err.len() < 200, "{} bytes: {err}", err.len());
        assert!(err.contains("(10000 bytes)"), "{err}");
        // Cutting never splits a character.
        let wide = "é".repeat(100);
        assert!(quoted(&wide).contains("(200 bytes)"));
        assert_eq!(quoted("emb"), "\"emb\"");
    }
}
