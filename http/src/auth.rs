//! Bearer tokens: standard JWTs (HS256), so an identity provider holding
//! the secret can mint them too.
//!
//! A token's claims are `sub` (the rider's id; `app` or `ops` for those
//! roles), `role`, `iat` and `exp` (enforced); its header names the key
//! that signed it (`kid`, the first 8 hex digits of the key's SHA-256).
//! The signing key is 32 random bytes in `<data-dir>/secret.key`, created
//! on first start, readable by its owner alone; `grabflow token` signs with
//! it. Any `<data-dir>/secret.*.key` file (say `secret.previous.key`) is a
//! key that still verifies but no longer signs, so a secret is rotated
//! without logging everyone out: move `secret.key` aside under such a name,
//! restart (a new `secret.key` is made), and delete the old file once its
//! tokens have expired.

use crate::error::ApiError;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use grabflow_api::Id;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
/// The keys tokens are signed and verified with, and the tokens verified
/// lately (a request's token is checked once a while, not on every call).
#[derive(Clone)]
pub struct Secret(Arc<Keys>, Arc<Mutex<HashMap<String, (Claims, u64)>>>);

/// The signing key and every key that verifies.
struct Keys {
    /// `secret.key`: its `kid` and the key.
    signing: (String, EncodingKey),
    /// Every key that verifies, by `kid` (the signing one too).
    verifying: HashMap<String, DecodingKey>,
}

/// A token's claims as the JWT carries them.
#[derive(Debug, Serialize, Deserialize)]
struct Jwt {
    /// The rider's id, or the role's name.
    sub: String,
    role: Role,
    /// Issued at, Unix seconds.
    iat: u64,
    /// Expires at, Unix seconds.
    exp: u64,
}

/// How long a token lasts when `grabflow token` is not told (`--ttl`):
/// a rider's a working day, an ops engineer's a shift, an app's a month.
pub fn default_ttl(role: Role) -> Duration {
    match role {
        Role::Rider | Role::Ops => Duration::from_secs(12 * 3600),
        Role::App => Duration::from_secs(30 * 24 * 3600),
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A key's id: the first 8 hex digits of its SHA-256.
fn kid(key: &[u8]) -> String {
    Sha256::digest(key)[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

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
    /// Loads `<dir>/secret.key` (the signing key), creating it (readable by
    /// its owner only) with fresh random bytes if missing, and every
    /// `<dir>/secret.*.key` (keys that still verify). A key file other
    /// users may read is refused.
    pub fn load_or_create(dir: &Path) -> Result<Secret, SecretError> {
        let io = |path: &Path| {
            let shown = path.display().to_string();
            move |source| SecretError::Io {
                path: shown.clone(),
                source,
            }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join("secret.key");
        let signing = create_or_read(&path)?;
        let damaged = |_| SecretError::Damaged(path.display().to_string());
        let mut verifying = HashMap::new();
        verifying.insert(
            kid(&signing),
            DecodingKey::from_secret(&signing).map_err(damaged)?,
        );
        let mut others: Vec<_> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n.starts_with("secret.") && n.ends_with(".key") && n != "secret.key"
                })
            })
            .collect();
        others.sort();
        for other in others {
            let key = read_key(&other)?;
            let decoding = DecodingKey::from_secret(&key)
                .map_err(|_| SecretError::Damaged(other.display().to_string()))?;
            verifying.insert(kid(&key), decoding);
        }
        let keys = Keys {
            signing: (
                kid(&signing),
                EncodingKey::from_secret(&signing).map_err(damaged)?,
            ),
            verifying,
        };
        Ok(Secret(Arc::new(keys), Arc::default()))
    }

    /// A token for `claims`, lasting the role's [`default_ttl`].
    pub fn sign(&self, claims: &Claims) -> String {
        self.sign_for(claims, default_ttl(claims.role))
    }

    /// A token for `claims`, lasting `ttl`.
    pub fn sign_for(&self, claims: &Claims, ttl: Duration) -> String {
        let iat = now_s();
        let jwt = Jwt {
            sub: match &claims.id {
                Some(id) => id.to_string(),
                None => format!("{:?}", claims.role).to_lowercase(),
            },
            role: claims.role,
            iat,
            exp: iat + ttl.as_secs().max(1),
        };
        let (kid, key) = &self.0.signing;
        let header = Header {
            kid: Some(kid.clone()),
            ..Header::new(Algorithm::HS256)
        };
        jsonwebtoken::encode(&header, &jwt, key).expect("HS256 signs any claims")
    }

    /// The claims of a token signed with one of the keys and not expired.
    pub fn verify(&self, token: &str) -> Option<Claims> {
        let now = now_s();
        if let Some((claims, exp)) = self.1.lock().expect("token cache").get(token) {
            return (*exp > now).then(|| claims.clone());
        }
        let (claims, exp) = self.verify_uncached(token)?;
        let mut cache = self.1.lock().expect("token cache");
        if cache.len() >= VERIFIED_CACHE {
            cache.clear();
        }
        cache.insert(token.to_string(), (claims.clone(), exp));
        Some(claims)
    }

    fn verify_uncached(&self, token: &str) -> Option<(Claims, u64)> {
        let kid = jsonwebtoken::decode_header(token).ok()?.kid?;
        let key = self.0.verifying.get(&kid)?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let jwt = jsonwebtoken::decode::<Jwt>(token, key, &validation)
            .ok()?
            .claims;
        let id = match jwt.role {
            Role::Rider => Some(Id::new(&jwt.sub).ok()?),
            Role::App | Role::Ops => None,
        };
        Some((Claims { role: jwt.role, id }, jwt.exp))
    }
}

/// The key in `path`, creating it (0600, fresh random bytes) if missing.
fn create_or_read(path: &Path) -> Result<[u8; 32], SecretError> {
    use std::os::unix::fs::OpenOptionsExt;
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
    let shown = path.display().to_string();
    let io = |source| SecretError::Io {
        path: shown.clone(),
        source,
    };
    match created {
        Ok(mut file) => {
            let key: [u8; 32] = rand::random();
            std::io::Write::write_all(&mut file, &key).map_err(io)?;
            file.sync_all().map_err(io)?;
            Ok(key)
        }
        // Made already (perhaps a moment ago by another process).
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read_key(path),
        Err(e) => Err(io(e)),
    }
}

/// The key in `path`, refused if other users may read it.
fn read_key(path: &Path) -> Result<[u8; 32], SecretError> {
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display().to_string();
    let io = |source| SecretError::Io {
        path: shown.clone(),
        source,
    };
    let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
    if mode & 0o007 != 0 {
        return Err(SecretError::Exposed { path: shown, mode });
    }
    std::fs::read(path)
        .map_err(io)?
        .try_into()
        .map_err(|_| SecretError::Damaged(shown.clone()))
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

    #[test]
    fn tokens_are_jwts_that_expire_and_survive_a_rotation_of_the_secret() {
        let dir = std::env::temp_dir().join(format!("grabflow-jwt-{}", rand::random::<u64>()));
        let first = Secret::load_or_create(&dir).unwrap();
        let rider = Claims {
            role: Role::Rider,
            id: Some(Id::new("R7").unwrap()),
        };
        let token = first.sign(&rider);
        // A standard JWT: three parts, HS256, the signing key's id.
        assert_eq!(token.split('.').count(), 3);
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.alg, Algorithm::HS256);
        assert_eq!(header.kid.as_deref(), Some(first.0.signing.0.as_str()));
        assert_eq!(first.verify(&token), Some(rider.clone()));

        // Expired, or of the old home-made form: refused.
        let expired = Jwt {
            sub: "ops".into(),
            role: Role::Ops,
            iat: 0,
            exp: 1,
        };
        let (kid, key) = &first.0.signing;
        let header = Header {
            kid: Some(kid.clone()),
            ..Header::new(Algorithm::HS256)
        };
        let old = jsonwebtoken::encode(&header, &expired, key).unwrap();
        assert_eq!(first.verify(&old), None, "exp is enforced");
        let old_form = token
            .rsplit_once('.')
            .map(|(_, tag)| format!("eyJyb2xlIjoib3BzIn0.{tag}"));
        assert_eq!(first.verify(&old_form.unwrap()), None);

        // Rotation: the old key moved aside still verifies; the new one signs.
        std::fs::rename(dir.join("secret.key"), dir.join("secret.previous.key")).unwrap();
        let second = Secret::load_or_create(&dir).unwrap();
        assert_ne!(second.0.signing.0, first.0.signing.0);
        assert_eq!(second.verify(&token), Some(rider.clone()));
        let fresh = second.sign_for(&rider, Duration::from_secs(60));
        assert_eq!(second.verify(&fresh), Some(rider.clone()));
        assert_eq!(
            first.verify(&fresh),
            None,
            "the old secret does not know the new key"
        );
        // The old key deleted: its tokens stop working.
        std::fs::remove_file(dir.join("secret.previous.key")).unwrap();
        let third = Secret::load_or_create(&dir).unwrap();
        assert_eq!(third.verify(&token), None);
        assert_eq!(third.verify(&fresh), Some(rider));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
