//! The Pusher Channels protocol (version 7) and HTTP API, as pure code: the apps this node serves
//! ([`Apps`]), the signatures that authenticate everything ([`sign`]), the WebSocket messages
//! ([`protocol`]) and the socket ids ([`socket_id`]).
//!
//! Laravel's real-time stack (laravel-echo with pusher-js in the browser, the Pusher HTTP API from the
//! back end) speaks this protocol; so do Reverb, Soketi and sockudo. Nothing here knows the shard or a
//! socket: the session is `connection::pusher`, the HTTP routes are `api::pusher`, and the frames
//! deliveries are written in for Pusher connections are `delivery`'s `Encoding::Pusher`.

pub mod protocol;
pub mod sign;
pub mod socket_id;

/// One Pusher app: what `PUSHER_APPS` lists as `id:key:secret`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PusherApp {
    /// The app id of the HTTP API's paths (`/apps/{id}/…`).
    pub id: String,
    /// The public key clients connect with (`/app/{key}`) and that prefixes every signature.
    pub key: String,
    /// The secret every signature is an HMAC-SHA256 under; never sent.
    pub secret: String,
}

/// The apps of this node, looked up by key (WebSocket) or by id (HTTP API). A handful at most, so a
/// list scanned in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Apps {
    /// In the order configured.
    list: Vec<PusherApp>,
}

impl Apps {
    /// Parses `id:key:secret` entries separated by commas or newlines (blank lines and lines starting
    /// with `#` are skipped, for a file). Each part must be non-empty; ids and keys must be unique.
    pub fn parse(text: &str) -> Result<Apps, String> {
        let mut list: Vec<PusherApp> = Vec::new();
        for entry in text.split([',', '\n']).map(str::trim) {
            if entry.is_empty() || entry.starts_with('#') {
                continue;
            }
            let mut parts = entry.splitn(3, ':');
            let (Some(id), Some(key), Some(secret)) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(format!(
                    "a Pusher app is id:key:secret, got {:?}",
                    entry.split(':').next().unwrap_or_default()
                ));
            };
            if id.is_empty() || key.is_empty() || secret.is_empty() {
                return Err(format!(
                    "the Pusher app {id:?} has an empty id, key or secret"
                ));
            }
            let safe = |s: &str| {
                s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            };
            if !safe(id) || !safe(key) {
                return Err(format!(
                    "the Pusher app {id:?}: ids and keys are letters, digits, '-', '_' and '.'"
                ));
            }
            if list.iter().any(|a| a.id == id || a.key == key) {
                return Err(format!("the Pusher app id or key {id:?} is listed twice"));
            }
            list.push(PusherApp {
                id: id.to_owned(),
                key: key.to_owned(),
                secret: secret.to_owned(),
            });
        }
        Ok(Apps { list })
    }

    /// Whether no app is configured (the Pusher routes then answer 404).
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The app whose public key is `key`.
    pub fn by_key(&self, key: &str) -> Option<&PusherApp> {
        self.list.iter().find(|a| a.key == key)
    }

    /// The index of the app whose public key is `key` (what a connection keeps: four bytes).
    pub fn index_of_key(&self, key: &str) -> Option<u32> {
        self.list
            .iter()
            .position(|a| a.key == key)
            .map(|i| i as u32)
    }

    /// The app at `index` (from [`Apps::index_of_key`] on the same list).
    pub fn get(&self, index: u32) -> &PusherApp {
        &self.list[index as usize]
    }

    /// The app whose id is `id`.
    pub fn by_id(&self, id: &str) -> Option<&PusherApp> {
        self.list.iter().find(|a| a.id == id)
    }
}

/// Where a Laravel user's notifications go for Pusher clients: `PUSHER_USER_CHANNEL`, a channel name
/// with one `{id}` (`private-App.Models.User.{id}`), split around it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserChannelPattern {
    /// What comes before `{id}`.
    pub prefix: String,
    /// What comes after `{id}`.
    pub suffix: String,
}

impl UserChannelPattern {
    /// Parses a pattern with exactly one `{id}`.
    pub fn parse(pattern: &str) -> Result<UserChannelPattern, String> {
        match pattern.split_once("{id}") {
            Some((prefix, suffix)) if !suffix.contains("{id}") => Ok(UserChannelPattern {
                prefix: prefix.to_owned(),
                suffix: suffix.to_owned(),
            }),
            _ => Err(format!(
                "PUSHER_USER_CHANNEL must contain {{id}} exactly once, got {pattern:?}"
            )),
        }
    }

    /// The user a channel name of this pattern is for (`None` when it is not of the pattern).
    pub fn user_of<'a>(&self, channel: &'a str) -> Option<&'a str> {
        channel
            .strip_prefix(self.prefix.as_str())?
            .strip_suffix(self.suffix.as_str())
            .filter(|u| !u.is_empty())
    }

    /// The channel name of `user`.
    pub fn channel_of(&self, user: &str) -> String {
        format!("{}{user}{}", self.prefix, self.suffix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apps_parse_from_a_list_or_a_file_and_refuse_nonsense() {
        let apps = Apps::parse("1:key1:s1, 2:key2:se:cret").unwrap();
        assert_eq!(apps.by_key("key2").unwrap().secret, "se:cret");
        assert_eq!(apps.by_id("1").unwrap().key, "key1");
        assert!(apps.by_key("nope").is_none());
        let file = Apps::parse("# apps\n1:k:s\n\n2:k2:s2\n").unwrap();
        assert_eq!(file.by_id("2").unwrap().key, "k2");
        assert!(Apps::parse("").unwrap().is_empty());
        assert!(Apps::parse("1:k").is_err());
        assert!(Apps::parse("1::s").is_err());
        assert!(Apps::parse("1:k:s,1:k2:s").is_err());
        assert!(Apps::parse("1:k/x:s").is_err());
    }

    #[test]
    fn the_user_channel_pattern_names_and_recognises_a_users_channel() {
        let p = UserChannelPattern::parse("private-App.Models.User.{id}").unwrap();
        assert_eq!(p.channel_of("42"), "private-App.Models.User.42");
        assert_eq!(p.user_of("private-App.Models.User.42"), Some("42"));
        assert_eq!(p.user_of("private-App.Models.User."), None);
        assert_eq!(p.user_of("private-other"), None);
        assert!(UserChannelPattern::parse("no-id").is_err());
        assert!(UserChannelPattern::parse("{id}.{id}").is_err());
    }
}
