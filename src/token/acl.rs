//! Who may do what: ACL rules matched against an account, its claims and each requested
//! scope. The grant is the union of every matching rule's actions, intersected with what was
//! asked; no rule, no access.
//!
//! Patterns are globs (`*` any run of characters, `?` one). `${account}` and
//! `${claims.<name>}` expand to *literal* text: a claim value of `*` matches only `*`, so an
//! identity provider's claims can never widen a rule.

use std::collections::BTreeMap;

use crate::config::AclRuleConfig;
use crate::oci::Scope;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(String),
    Star,
    Question,
}

/// Whether `text` matches the glob `pattern` (no `${…}` expansion).
pub(crate) fn glob_matches(pattern: &str, text: &str) -> bool {
    compile(pattern, &|_| None)
        .ok()
        .flatten()
        .is_some_and(|p| matches(&p, text))
}

/// Checks that a pattern's `${…}` expansions are ones we know.
pub(crate) fn check_template(pattern: &str) -> Result<(), String> {
    compile(pattern, &|_| Some(String::new())).map(|_| ())
}

/// Turns a pattern into tokens, expanding `${…}` with `lookup` (a missing value makes the
/// rule not apply: `Ok(None)`).
fn compile(
    pattern: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Vec<Token>>, String> {
    let mut out = Vec::new();
    let mut literal = String::new();
    let mut rest = pattern;
    while let Some(c) = rest.chars().next() {
        if let Some(after) = rest.strip_prefix("${") {
            let end = after
                .find('}')
                .ok_or_else(|| format!("unterminated \"${{\" in {pattern:?}"))?;
            let var = &after[..end];
            if var != "account" && var.strip_prefix("claims.").is_none_or(str::is_empty) {
                return Err(format!(
                    "unknown variable ${{{var}}} (use ${{account}} or ${{claims.<name>}})"
                ));
            }
            match lookup(var) {
                Some(v) => literal.push_str(&v),
                None => return Ok(None),
            }
            rest = &after[end + 1..];
            continue;
        }
        match c {
            '*' | '?' => {
                if !literal.is_empty() {
                    out.push(Token::Literal(std::mem::take(&mut literal)));
                }
                out.push(if c == '*' {
                    Token::Star
                } else {
                    Token::Question
                });
            }
            c => literal.push(c),
        }
        rest = &rest[c.len_utf8()..];
    }
    if !literal.is_empty() {
        out.push(Token::Literal(literal));
    }
    Ok(Some(out))
}

/// Glob matching in O(pattern × text): the classic backtrack-to-the-last-star walk, so no
/// pattern can make a name cost more than a few thousand steps.
fn matches(tokens: &[Token], text: &str) -> bool {
    #[derive(Clone, Copy, PartialEq)]
    enum P {
        Char(char),
        Any,
        Star,
    }
    let pattern: Vec<P> = tokens
        .iter()
        .flat_map(|t| match t {
            Token::Literal(l) => l.chars().map(P::Char).collect::<Vec<_>>(),
            Token::Question => vec![P::Any],
            Token::Star => vec![P::Star],
        })
        .collect();
    let text: Vec<char> = text.chars().collect();
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(P::Star) => {
                star = Some((p, t));
                p += 1;
            }
            Some(P::Any) => {
                p += 1;
                t += 1;
            }
            Some(P::Char(c)) if *c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                // Let the last star swallow one more character and try again from there.
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|x| *x == P::Star)
}

/// An identity's claims, flattened to strings (numbers and booleans as their JSON text).
pub(crate) type ClaimMap = BTreeMap<String, String>;

pub(crate) struct Acl {
    rules: Vec<AclRuleConfig>,
}

impl Acl {
    pub(crate) fn new(rules: Vec<AclRuleConfig>) -> Acl {
        Acl { rules }
    }

    /// The actions `account` (with `claims`) may have on `scope`, among those asked.
    pub(crate) fn grant(&self, account: &str, claims: &ClaimMap, scope: &Scope) -> Vec<String> {
        let lookup = |var: &str| -> Option<String> {
            if var == "account" {
                Some(account.to_string())
            } else {
                claims.get(var.strip_prefix("claims.")?).cloned()
            }
        };
        let mut allowed: Vec<&str> = Vec::new();
        for rule in &self.rules {
            let kind_ok =
                rule.kind == scope.kind || (rule.kind == "repository" && scope.is_repository());
            let account_ok = compile(&rule.account, &lookup)
                .ok()
                .flatten()
                .is_some_and(|p| matches(&p, account));
            let claims_ok = rule
                .claims
                .iter()
                .all(|(k, v)| claims.get(k).is_some_and(|c| c == v));
            let name_ok = compile(&rule.repository, &lookup)
                .ok()
                .flatten()
                .is_some_and(|p| matches(&p, &scope.name));
            if kind_ok && account_ok && claims_ok && name_ok {
                allowed.extend(rule.actions.iter().map(String::as_str));
            }
        }
        let all = allowed.contains(&"*");
        scope
            .actions
            .iter()
            .filter(|a| all || allowed.contains(&a.as_str()))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(
        account: &str,
        repository: &str,
        claims: &[(&str, &str)],
        actions: &[&str],
    ) -> AclRuleConfig {
        AclRuleConfig {
            account: account.into(),
            kind: "repository".into(),
            repository: repository.into(),
            claims: claims
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            actions: actions.iter().map(|a| a.to_string()).collect(),
        }
    }

    fn claims(pairs: &[(&str, &str)]) -> ClaimMap {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn want(name: &str, actions: &[&str]) -> Scope {
        Scope::repository(name, actions)
    }

    #[test]
    fn globs() {
        let c = |p: &str| compile(p, &|_| None).unwrap().unwrap();
        assert!(matches(&c("*"), "a/b/c"));
        assert!(matches(&c("team/*"), "team/x/y"));
        assert!(!matches(&c("team/*"), "teams/x"));
        assert!(matches(&c("a?c"), "abc"));
        assert!(!matches(&c("a?c"), "ac"));
        assert!(matches(&c("*-dev"), "app-dev"));
        assert!(!matches(&c("*-dev"), "app-prod"));
        assert!(matches(&c(""), ""));
        assert!(matches(&c("a*b*c"), "axxbyyc"));
        assert!(!matches(&c("a*b*c"), "axxbyy"));
        assert!(matches(&c("**"), ""));
        // Adversarial: many stars against a long name stays fast.
        let long = format!("team-{}", "/".repeat(250));
        assert!(!matches(&c("team-*/*/*/*x"), &long));
    }

    #[test]
    fn union_of_rules_intersected_with_the_request() {
        let acl = Acl::new(vec![
            rule("alice", "*", &[], &["pull"]),
            rule("alice", "alice/*", &[], &["push"]),
            rule("*", "public/*", &[], &["pull"]),
        ]);
        let none = ClaimMap::new();
        assert_eq!(
            acl.grant("alice", &none, &want("alice/app", &["pull", "push"])),
            ["pull", "push"]
        );
        assert_eq!(
            acl.grant("alice", &none, &want("bob/app", &["pull", "push"])),
            ["pull"]
        );
        assert_eq!(
            acl.grant("anonymous", &none, &want("public/x", &["pull", "push"])),
            ["pull"]
        );
        assert!(
            acl.grant("anonymous", &none, &want("private/x", &["pull"]))
                .is_empty()
        );
        assert!(
            acl.grant("alice", &none, &want("alice/app", &["delete"]))
                .is_empty()
        );
    }

    #[test]
    fn claims_and_templates() {
        let acl = Acl::new(vec![
            rule(
                "ci:*",
                "myorg/${claims.repository_name}",
                &[("repository_owner", "myorg")],
                &["pull", "push"],
            ),
            rule("*", "home/${account}", &[], &["*"]),
        ]);
        let ci = claims(&[("repository_owner", "myorg"), ("repository_name", "tool")]);
        assert_eq!(
            acl.grant("ci:123", &ci, &want("myorg/tool", &["push"])),
            ["push"]
        );
        assert!(
            acl.grant("ci:123", &ci, &want("myorg/other", &["push"]))
                .is_empty()
        );
        let foreign = claims(&[("repository_owner", "evil"), ("repository_name", "tool")]);
        assert!(
            acl.grant("ci:123", &foreign, &want("myorg/tool", &["pull"]))
                .is_empty()
        );
        // A claim value with glob characters matches only itself.
        let sneaky = claims(&[("repository_owner", "myorg"), ("repository_name", "*")]);
        assert!(
            acl.grant("ci:1", &sneaky, &want("myorg/tool", &["pull"]))
                .is_empty()
        );
        // A missing claim makes the rule not apply.
        let partial = claims(&[("repository_owner", "myorg")]);
        assert!(
            acl.grant("ci:1", &partial, &want("myorg/tool", &["pull"]))
                .is_empty()
        );
        assert_eq!(
            acl.grant(
                "bob",
                &ClaimMap::new(),
                &want("home/bob", &["pull", "delete"])
            ),
            ["pull", "delete"]
        );
        assert!(
            acl.grant("bob", &ClaimMap::new(), &want("home/alice", &["pull"]))
                .is_empty()
        );
    }

    #[test]
    fn templates_are_checked() {
        assert!(check_template("org/${claims.repo}").is_ok());
        assert!(check_template("${account}/*").is_ok());
        assert!(
            check_template("${nope}")
                .unwrap_err()
                .contains("unknown variable")
        );
        assert!(
            check_template("${account")
                .unwrap_err()
                .contains("unterminated")
        );
    }
}
