//! `${VAR}` and `${VAR:-default}` expansion for config string values.

/// Expands every `${NAME}` / `${NAME:-default}` in `s` using `lookup`. `$$` is a literal `$`.
/// Errors name the variable that is unset and has no default.
pub(crate) fn expand(s: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
            continue;
        }
        let Some(body) = after.strip_prefix('{') else {
            out.push('$');
            rest = after;
            continue;
        };
        let end = body
            .find('}')
            .ok_or_else(|| format!("unterminated \"${{\" in {s:?}"))?;
        let expr = &body[..end];
        let (name, default) = match expr.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (expr, None),
        };
        let valid = !name.is_empty()
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !name.as_bytes()[0].is_ascii_digit();
        if !valid {
            return Err(format!("invalid variable name {name:?} in \"${{{expr}}}\""));
        }
        match (lookup(name), default) {
            (Some(v), Some(d)) if v.is_empty() => out.push_str(d),
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err(format!(
                    "environment variable {name} is not set (write ${{{name}:-default}} for a default)"
                ));
            }
        }
        rest = &body[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("example.com".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands_defaults_and_literals() {
        assert_eq!(
            expand("https://${HOST}/x", &env).unwrap(),
            "https://example.com/x"
        );
        assert_eq!(expand("${NOPE:-fallback}", &env).unwrap(), "fallback");
        assert_eq!(expand("${EMPTY:-d}", &env).unwrap(), "d");
        assert_eq!(expand("${NOPE:-}", &env).unwrap(), "");
        assert_eq!(expand("[${EMPTY}]", &env).unwrap(), "[]");
        assert_eq!(
            expand("cost $5 and $$HOME", &env).unwrap(),
            "cost $5 and $HOME"
        );
        assert_eq!(
            expand("${HOST}${HOST}", &env).unwrap(),
            "example.comexample.com"
        );
    }

    #[test]
    fn reports_unset_and_malformed() {
        assert!(
            expand("${NOPE}", &env)
                .unwrap_err()
                .contains("NOPE is not set")
        );
        assert!(expand("${HOST", &env).unwrap_err().contains("unterminated"));
        assert!(
            expand("${1X}", &env)
                .unwrap_err()
                .contains("invalid variable name")
        );
    }
}
