//! Who may use the console: the random tokens printed in its URLs (one for the admin, an optional
//! read-only one for a wallboard), how a request presents one (the `token` query parameter, which
//! also sets a cookie, or that cookie afterwards) and the constant-time comparison that checks it.

use subtle::ConstantTimeEq;

/// Bytes of randomness in a token (printed as twice as many hex digits).
pub const TOKEN_BYTES: usize = 24;

/// Name of the cookie that carries the token after the first visit.
pub const COOKIE_NAME: &str = "flashgate_console";

/// Header a state-changing request (POST) must carry the admin token in: a cookie alone is not
/// enough, so another page the browser has open cannot act through it.
pub const ACTION_HEADER: &str = "x-console-token";

/// What a valid token lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Every page and every action.
    Admin,
    /// Every page, no action (a shop-floor screen).
    Wallboard,
}

impl Role {
    /// The role's name as the page shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Wallboard => "wallboard",
        }
    }
}

/// The console's tokens.
#[derive(Clone)]
pub struct Tokens {
    admin: String,
    wallboard: Option<String>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens").field("wallboard", &self.wallboard.is_some()).finish_non_exhaustive()
    }
}

/// A fresh random token: [`TOKEN_BYTES`] from the operating system, in hex.
pub fn random_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; TOKEN_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

impl Tokens {
    /// Fresh random tokens: always an admin token, a wallboard token when asked for.
    pub fn generate(wallboard: bool) -> Self {
        Self { admin: random_token(), wallboard: wallboard.then(random_token) }
    }

    /// Given tokens (tests).
    pub fn new(admin: impl Into<String>, wallboard: Option<String>) -> Self {
        Self { admin: admin.into(), wallboard }
    }

    /// The admin token.
    pub fn admin(&self) -> &str {
        &self.admin
    }

    /// The wallboard token, when there is one.
    pub fn wallboard(&self) -> Option<&str> {
        self.wallboard.as_deref()
    }

    /// The role `presented` grants, compared in constant time with every token (an empty or
    /// missing token grants nothing).
    pub fn role_of(&self, presented: &str) -> Option<Role> {
        if presented.is_empty() {
            return None;
        }
        let admin = bool::from(presented.as_bytes().ct_eq(self.admin.as_bytes()));
        let wall = self.wallboard.as_deref().is_some_and(|w| bool::from(presented.as_bytes().ct_eq(w.as_bytes())));
        if admin {
            Some(Role::Admin)
        } else if wall {
            Some(Role::Wallboard)
        } else {
            None
        }
    }

    /// Whether `presented` is the admin token (constant time).
    pub fn is_admin(&self, presented: &str) -> bool {
        !presented.is_empty() && bool::from(presented.as_bytes().ct_eq(self.admin.as_bytes()))
    }
}

/// The value of cookie `name` in a `Cookie` header, if present.
pub fn cookie_value<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').map(str::trim).find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
}

/// The value of `token` in a raw query string, if present (tokens are hex: no decoding needed).
pub fn query_token(query: &str) -> Option<&str> {
    query.split('&').find_map(|kv| kv.strip_prefix("token="))
}

/// The `Set-Cookie` value that keeps `token` for the rest of the visit (not readable by scripts,
/// never sent with another site's requests).
pub fn set_cookie(token: &str) -> String {
    format!("{COOKIE_NAME}={token}; Path=/; HttpOnly; SameSite=Strict")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn tokens_grant_their_role_only() {
        let t = Tokens::new("aaaa", Some("bbbb".into()));
        assert_eq!(t.role_of("aaaa"), Some(Role::Admin));
        assert_eq!(t.role_of("bbbb"), Some(Role::Wallboard));
        assert_eq!(t.role_of("aaab"), None);
        assert_eq!(t.role_of("aaa"), None);
        assert_eq!(t.role_of(""), None);
        assert!(t.is_admin("aaaa") && !t.is_admin("bbbb") && !t.is_admin(""));
        let no_wall = Tokens::new("aaaa", None);
        assert_eq!(no_wall.role_of("bbbb"), None);
        assert_eq!(no_wall.role_of(""), None);
    }

    #[test]
    fn generated_tokens_are_long_distinct_hex() {
        let t = Tokens::generate(true);
        assert_eq!(t.admin().len(), 2 * TOKEN_BYTES);
        assert!(t.admin().bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(Some(t.admin()), t.wallboard());
        assert!(Tokens::generate(false).wallboard().is_none());
        assert!(!format!("{t:?}").contains(t.admin()), "Debug never shows a token");
    }

    #[test]
    fn tokens_are_found_in_cookies_and_queries() {
        assert_eq!(cookie_value("a=1; flashgate_console=abc; b=2", COOKIE_NAME), Some("abc"));
        assert_eq!(cookie_value("flashgate_consolex=abc", COOKIE_NAME), None);
        assert_eq!(query_token("x=1&token=ff00"), Some("ff00"));
        assert_eq!(query_token("tokens=ff00"), None);
        assert!(set_cookie("ff").contains("HttpOnly") && set_cookie("ff").contains("SameSite=Strict"));
    }
}
