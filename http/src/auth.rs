//! Signed bearer tokens with a role (API.md "Auth").
//!
//! A token is `base64url(claims JSON) "." base64url(HMAC-SHA256(secret,
//! claims))`. The secret is 32 random bytes kept in `<data-dir>/secret.key`,
//! created on first start; `grabflow token` signs with the same file.

use crate::error::ApiError;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use grabflow_api::Id;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::path::Path;
use std::sync::Arc;

/// Who a token speaks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Order service, rider app backend, merchant app.
    App,
    /// One rider (the token names which).
    Rider,
    /// Operations: everything.
    Ops,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "app" => Ok(Role::App),
            "rider" => Ok(Role::Rider),
            "ops" => Ok(Role::Ops),
            other => Err(format!("role must be app, rider or ops, not {other:?}")),
        }
    }
}

/// What a valid token says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The role.
    pub role: Role,
    /// For riders, the rider id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Id>,
}

impl Claims {
    /// Allows `roles`; a rider is allowed only for its own id when `rider` is given.
    pub fn require(&self, roles: &[Role], rider: Option<&Id>) -> Result<(), ApiError> {
        if self.role == Role::Ops {
            return Ok(());
        }
        if !roles.contains(&self.role) {
            let role = format!("{:?}", self.role).to_lowercase();
            return Err(ApiError::forbidden(format!(
                "this call is not allowed with a token of role {role}"
            )));
        }
        if self.role == Role::Rider {
            if let Some(rider) = rider {
                if self.id.as_ref() != Some(rider) {
                    return Err(ApiError::forbidden(
                        "a rider token may only act for its own rider",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The server's signing secret, with a cache of tokens already verified
/// (verifying costs an HMAC, a base64 decode and a JSON parse per request).
#[derive(Clone)]
pub struct Secret(
    Arc<[u8; 32]>,
    Arc<std::sync::Mutex<std::collections::HashMap<String, Claims>>>,
);

/// Verified tokens remembered at most (the cache is emptied when full).
const VERIFIED_CACHE: usize = 100_000;

/// Errors loading the secret.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file could not be read or created.
    #[error("secret file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The file exists but is not 32 bytes.
    #[error("secret file {0} is damaged (expected 32 bytes)")]
    Damaged(String),
    /// Other users may read the file, and so sign any token.
    #[error(
        "secret file {path} can be read by other users (mode {mode:o}), who could sign any \
         token with it; run `chmod 600 {path}` (and rotate it if others may have read it)"
    )]
    Exposed {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
}

impl Secret {
    /// Loads `<dir>/secret.key`, creating it (readable by its owner only)
    /// with fresh random bytes if missing. A file other users may read is
    /// refused.
    pub fn load_or_create(dir: &Path) -> Result<Secret, SecretError> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let path = dir.join("secret.key");
        let shown = path.display().to_string();
        let io = |source| SecretError::Io {
            path: shown.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path);
        match created {
            Ok(mut file) => {
                let key: [u8; 32] = rand::random();
                std::io::Write::write_all(&mut file, &key).map_err(io)?;
                file.sync_all().map_err(io)?;
                return Ok(Secret(Arc::new(key), Arc::default()));
            }
            // Made already (perhaps a moment ago by another process).
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(e)),
        }
        let mode = std::fs::metadata(&path).map_err(io)?.permissions().mode() & 0o777;
        if mode & 0o007 != 0 {
            return Err(SecretError::Exposed { path: shown, mode });
        }
        let key: [u8; 32] = std::fs::read(&path)
            .map_err(io)?
            .try_into()
            .map_err(|_| SecretError::Damaged(shown.clone()))?;
        Ok(Secret(Arc::new(key), Arc::default()))
    }

    fn mac(&self, data: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0[..]).expect("any key length works");
        mac.update(data);
        mac
    }

    /// A token for `claims`.
    pub fn sign(&self, claims: &Claims) -> String {
        let payload = B64.encode(serde_json::to_vec(claims).expect("claims serialize"));
        let tag = B64.encode(self.mac(payload.as_bytes()).finalize().into_bytes());
        format!("{payload}.{tag}")
    }

    /// The claims of a token signed with this secret.
    pub fn verify(&self, token: &str) -> Option<Claims> {
        if let Some(claims) = self.1.lock().expect("token cache").get(token) {
            return Some(claims.clone());
        }
        let claims = self.verify_uncached(token)?;
        let mut cache = self.1.lock().expect("token cache");
        if cache.len() >= VERIFIED_CACHE {
            cache.clear();
        }
        cache.insert(token.to_string(), claims.clone());
        Some(claims)
    }

    fn verify_uncached(&self, token: &str) -> Option<Claims> {
        let (payload, tag) = token.split_once('.')?;
        let tag = B64.decode(tag).ok()?;
        self.mac(payload.as_bytes()).verify_slice(&tag).ok()?;
        serde_json::from_slice(&B64.decode(payload).ok()?).ok()
    }
}

/// A router's state that verifies tokens (what [`Auth`] needs of it).
pub trait HasSecret {
    /// The secret tokens are checked against.
    fn secret(&self) -> &Secret;
}

impl<T: HasSecret> HasSecret for Arc<T> {
    fn secret(&self) -> &Secret {
        (**self).secret()
    }
}

/// Extractor: the verified claims of the request's bearer token.
pub struct Auth(pub Claims);

/// The claims of a request's `Authorization: Bearer` token, verified
/// already by a layer in front of the routes (the rate limit), left in the
/// request's extensions so [`Auth`] does not verify it again.
#[derive(Clone, Debug)]
pub struct VerifiedBearer(pub Claims);

impl<S: HasSecret + Send + Sync> FromRequestParts<S> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        if let Some(VerifiedBearer(claims)) = parts.extensions.remove::<VerifiedBearer>() {
            return Ok(Auth(claims));
        }
        let secret = state.secret();
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| ApiError::unauthorized("send Authorization: Bearer <token>"))?;
        let token = header
            .strip_prefix("Bearer ")
            .ok_or_else(|| ApiError::unauthorized("expected a Bearer token"))?;
        secret
            .verify(token.trim())
            .map(Auth)
            .ok_or_else(|| ApiError::unauthorized("the token is not valid"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_only_with_their_secret_and_unchanged() {
        let dir = std::env::temp_dir().join(format!("grabflow-secret-{}", rand::random::<u64>()));
        let secret = Secret::load_or_create(&dir).unwrap();
        let again = Secret::load_or_create(&dir).unwrap();
        let claims = Claims {
            role: Role::Rider,
            id: Some(Id::new("R1").unwrap()),
        };
        let token = secret.sign(&claims);
        assert_eq!(again.verify(&token), Some(claims.clone()));
        let other = Secret::load_or_create(&dir.join("other")).unwrap();
        assert_eq!(other.verify(&token), None);
        let forged = token.replacen('e', "f", 1);
        assert!(forged == token || secret.verify(&forged).is_none());
        assert!(claims
            .require(&[Role::Rider], Some(&Id::new("R1").unwrap()))
            .is_ok());
        assert_eq!(
            claims
                .require(&[Role::Rider], Some(&Id::new("R2").unwrap()))
                .unwrap_err()
                .code,
            "forbidden"
        );
        assert_eq!(
            claims.require(&[Role::App], None).unwrap_err().code,
            "forbidden"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_secret_is_made_for_its_owner_alone_and_refused_when_others_may_read_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("grabflow-secret-{}", rand::random::<u64>()));
        let secret = Secret::load_or_create(&dir).unwrap();
        let path = dir.join("secret.key");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let Err(e) = Secret::load_or_create(&dir) else {
            panic!("a secret others may read is refused");
        };
        assert!(matches!(e, SecretError::Exposed { mode: 0o644, .. }), "{e}");
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let again = Secret::load_or_create(&dir).unwrap();
        let claims = Claims {
            role: Role::Ops,
            id: None,
        };
        assert_eq!(again.verify(&secret.sign(&claims)), Some(claims));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
