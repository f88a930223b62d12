//! The top-level sections of the configuration file: the one list of their
//! names, used by the schema walk (known keys, key paths) and by the
//! environment overrides (which sections they may set).

/// A top-level section of the configuration file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Section {
    /// `[redis]`
    Redis,
    /// `[amqp]`
    Amqp,
    /// `[tls]`
    Tls,
    /// `[admin]`
    Admin,
    /// `[token-broker]`
    TokenBroker,
    /// `[form-processor]`
    FormProcessor,
    /// `[[oauth-profiles]]`
    OAuthProfiles,
    /// `[[incoming-mail]]`
    IncomingMail,
    /// `[[topics]]`
    Topics,
}

impl Section {
    /// Every section, in the order of the file's documentation (an unknown
    /// key's "did you mean" hint names the first close match in this order).
    pub(crate) const ALL: [Section; 9] = [
        Self::Redis,
        Self::Amqp,
        Self::Tls,
        Self::Admin,
        Self::TokenBroker,
        Self::FormProcessor,
        Self::OAuthProfiles,
        Self::IncomingMail,
        Self::Topics,
    ];

    /// The key in the file and the first part of every key path below it.
    pub(crate) fn key(self) -> &'static str {
        match self {
            Self::Redis => "redis",
            Self::Amqp => "amqp",
            Self::Tls => "tls",
            Self::Admin => "admin",
            Self::TokenBroker => "token-broker",
            Self::FormProcessor => "form-processor",
            Self::OAuthProfiles => "oauth-profiles",
            Self::IncomingMail => "incoming-mail",
            Self::Topics => "topics",
        }
    }

    /// True for a single table (`[redis]`), which the environment may
    /// override; false for an array of tables (`[[topics]]`), which comes
    /// from the file only.
    pub(crate) fn is_single(self) -> bool {
        !matches!(
            self,
            Self::OAuthProfiles | Self::IncomingMail | Self::Topics
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn section_keys_are_distinct_kebab_case() {
        let keys: std::collections::HashSet<_> = Section::ALL.iter().map(|s| s.key()).collect();
        assert_eq!(keys.len(), Section::ALL.len());
        for key in keys {
            assert!(
                key.chars().all(|c| c.is_ascii_lowercase() || c == '-'),
                "{key}"
            );
        }
    }

    #[test]
    fn only_the_arrays_of_tables_are_not_single() {
        let arrays: Vec<_> = Section::ALL
            .into_iter()
            .filter(|s| !s.is_single())
            .map(Section::key)
            .collect();
        assert_eq!(arrays, ["oauth-profiles", "incoming-mail", "topics"]);
    }
}
