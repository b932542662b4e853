//! Bearer tokens shared by servers and workers (`--auth-token-file`): how a
//! token is read from its file and how it is compared.

use std::path::Path;

use crate::error::PsError;

/// The metadata key carrying `Bearer TOKEN`.
pub const HEADER: &str = "authorization";

/// Longest token accepted, in bytes.
pub const MAX_TOKEN_BYTES: usize = 4096;

/// Reads a token from `path`: the file's text without surrounding
/// whitespace, 16 to 4096 visible ASCII characters (it travels in a header).
pub fn read_token_file(path: &Path) -> Result<String, PsError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        PsError::invalid(format!(
            "cannot read auth token file {}: {e}",
            path.display()
        ))
    })?;
    let token = text.trim();
    if token.len() < 16 || token.len() > MAX_TOKEN_BYTES {
        return Err(PsError::invalid(format!(
            "auth token file {}: the token must be 16 to {MAX_TOKEN_BYTES} characters, got {}",
            path.display(),
            token.len()
        )));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(PsError::invalid(format!(
            "auth token file {}: the token must be visible ASCII characters (no spaces)",
            path.display()
        )));
    }
    Ok(token.to_string())
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_means_every_byte_equal() {
        assert!(constant_time_eq(b"abcdef", b"abcdef"));
        assert!(!constant_time_eq(b"abcdef", b"abcdeg"));
        assert!(!constant_time_eq(b"abcdef", b"abcde"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn token_files_are_trimmed_and_checked() {
        let dir = std::env::temp_dir().join(format!("ps-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "  0123456789abcdef-XYZ\n").unwrap();
        assert_eq!(read_token_file(&file).unwrap(), "0123456789abcdef-XYZ");
        std::fs::write(&file, "short\n").unwrap();
        assert!(
            read_token_file(&file)
                .unwrap_err()
                .to_string()
                .contains("16 to")
        );
        std::fs::write(&file, "0123456789 abcdef").unwrap();
        assert!(read_token_file(&file).is_err(), "inner space");
        let missing = read_token_file(&dir.join("nope")).unwrap_err();
        assert!(missing.to_string().contains("nope"), "{missing}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
