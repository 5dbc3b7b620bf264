//! Callback URLs and the allow-list they are checked against, parsed once with the `url` crate
//! (WHATWG URL parsing, the same the webhook client uses), never compared as strings: a string
//! prefix lets `http://hooks.example.com@10.0.0.1:6379/` or `http://hooks.example.com.evil/`
//! through.
//!
//! One [`CallbackUrl`] type is what a route's `callback_url`, a client's `Callback-Url` and a
//! delivery all use; one [`CallbackRule`] per `GATEWAY_CALLBACK_ALLOW` entry decides.

use url::{Host, Url};

/// Why a callback URL or an allow-list entry is refused. The text names the rule, never what a
/// name resolves to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallbackError {
    #[error("it is not a URL ({0})")]
    NotUrl(url::ParseError),
    #[error("only http and https are allowed")]
    Scheme,
    #[error("it carries a user name or password (userinfo), which is refused")]
    Userinfo,
    #[error("it has no host")]
    NoHost,
    #[error("it has a fragment, which is never sent")]
    Fragment,
    #[error(
        "its path encodes a slash, backslash or dot (%2F, %5C, %2E), which receivers may decode past the allowed path"
    )]
    EncodedSeparator,
    #[error("an allow-list entry cannot have a query")]
    RuleQuery,
    #[error(
        "it matches no allowed receiver (GATEWAY_CALLBACK_ALLOW: same scheme, host and port, path under the allowed one)"
    )]
    NotAllowed,
}

/// A URL a webhook may be sent to: http or https, with a host, without userinfo or fragment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackUrl(Url);

impl CallbackUrl {
    pub fn parse(text: &str) -> Result<Self, CallbackError> {
        let url = Url::parse(text).map_err(CallbackError::NotUrl)?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(CallbackError::Scheme);
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(CallbackError::Userinfo);
        }
        if url.host().is_none() {
            return Err(CallbackError::NoHost);
        }
        if url.fragment().is_some() {
            return Err(CallbackError::Fragment);
        }
        // Dot segments are resolved by the parser; encoded ones are not, and a receiver that
        // decodes before it normalizes would route `/in/..%2Fadmin` to `/admin`.
        let path = url.path().to_ascii_lowercase();
        if ["%2f", "%5c", "%2e"]
            .iter()
            .any(|encoded| path.contains(encoded))
        {
            return Err(CallbackError::EncodedSeparator);
        }
        Ok(Self(url))
    }

    /// The URL, normalized (lower-case host, default port dropped, path percent-encoded).
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    pub fn url(&self) -> &Url {
        &self.0
    }

    fn port(&self) -> u16 {
        self.0
            .port_or_known_default()
            .expect("http and https have default ports")
    }
}

/// One allowed receiver: a scheme, a host and a port that must match exactly, and a path a
/// callback URL's path must equal or lie under (at a `/` boundary: `/hooks` allows `/hooks` and
/// `/hooks/a`, not `/hooksevil`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackRule {
    scheme: String,
    host: Host<String>,
    port: u16,
    path: String,
}

impl CallbackRule {
    /// Parses an allow-list entry, itself a callback URL without a query (e.g.
    /// `https://hooks.example.com/gateway`).
    pub fn parse(text: &str) -> Result<Self, CallbackError> {
        let url = CallbackUrl::parse(text)?;
        if url.0.query().is_some() {
            return Err(CallbackError::RuleQuery);
        }
        Ok(Self {
            scheme: url.0.scheme().to_owned(),
            host: url.0.host().expect("checked by CallbackUrl").to_owned(),
            port: url.port(),
            path: url.0.path().to_owned(),
        })
    }

    pub fn allows(&self, url: &CallbackUrl) -> bool {
        let path = url.0.path();
        let under = match path.strip_prefix(self.path.as_str()) {
            Some(rest) => self.path.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
            None => false,
        };
        url.0.scheme() == self.scheme
            && url.0.host().is_some_and(|h| h.to_owned() == self.host)
            && url.port() == self.port
            && under
    }
}

/// Checks a client's `Callback-Url` against the allow-list: parsed, then matched by a rule.
pub fn allowed(text: &str, rules: &[CallbackRule]) -> Result<CallbackUrl, CallbackError> {
    let url = CallbackUrl::parse(text)?;
    if rules.iter().any(|rule| rule.allows(&url)) {
        Ok(url)
    } else {
        Err(CallbackError::NotAllowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(entries: &[&str]) -> Vec<CallbackRule> {
        entries
            .iter()
            .map(|e| CallbackRule::parse(e).unwrap())
            .collect()
    }

    #[test]
    fn only_the_same_scheme_host_port_and_path_subtree_are_allowed() {
        let rules = rules(&["http://hooks.example.com/in", "https://other.example/"]);
        for ok in [
            "http://hooks.example.com/in",
            "http://hooks.example.com/in/order?x=1",
            "http://HOOKS.example.com:80/in/a",
            "https://other.example/anything",
        ] {
            assert_eq!(allowed(ok, &rules).map(|_| ()), Ok(()), "{ok}");
        }
        for (bad, why) in [
            (
                "http://hooks.example.com@1.1.1.1:6379/in",
                CallbackError::Userinfo,
            ),
            (
                "http://user:pw@hooks.example.com/in",
                CallbackError::Userinfo,
            ),
            (
                "http://hooks.example.com:6379/in",
                CallbackError::NotAllowed,
            ),
            (
                "http://hooks.example.com.evil.net/in",
                CallbackError::NotAllowed,
            ),
            ("http://hooks.example.comevil/in", CallbackError::NotAllowed),
            ("http://hooks.example.com/inside", CallbackError::NotAllowed),
            ("http://hooks.example.com/", CallbackError::NotAllowed),
            ("https://hooks.example.com/in", CallbackError::NotAllowed),
            ("http://hooks.example.com/in#frag", CallbackError::Fragment),
            (
                "http://hooks.example.com/in/..%2Fadmin",
                CallbackError::EncodedSeparator,
            ),
            (
                "http://hooks.example.com/in/%2e%2e%2fadmin",
                CallbackError::EncodedSeparator,
            ),
            (
                "http://hooks.example.com/in/..%5cadmin",
                CallbackError::EncodedSeparator,
            ),
            ("ftp://hooks.example.com/in", CallbackError::Scheme),
        ] {
            assert_eq!(allowed(bad, &rules), Err(why), "{bad}");
        }
        assert!(matches!(
            allowed("not a url", &rules),
            Err(CallbackError::NotUrl(_))
        ));
        // Dot segments and encodings are resolved before matching.
        assert_eq!(
            allowed("http://hooks.example.com/in/../admin", &rules),
            Err(CallbackError::NotAllowed)
        );
    }

    #[test]
    fn allow_list_entries_are_urls_without_queries_or_userinfo() {
        assert_eq!(
            CallbackRule::parse("http://h.example/x?y=1"),
            Err(CallbackError::RuleQuery)
        );
        assert_eq!(
            CallbackRule::parse("http://u@h.example/"),
            Err(CallbackError::Userinfo)
        );
        assert!(matches!(
            CallbackRule::parse("http://"),
            Err(CallbackError::NotUrl(_) | CallbackError::NoHost)
        ));
    }
}
