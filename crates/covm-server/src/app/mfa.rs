//! Two-factor sign-in: TOTP (RFC 6238: HMAC-SHA-1, 6 digits, 30 s steps, one step of skew either
//! way, `totp-rs`) with ten single-use recovery codes, and the policy that requires it of groups.
//!
//! - Enrollment (`POST /users/{user}/mfa`, the user or a holder of `Users.Manage`) makes a secret and
//!   recovery codes; nothing changes for sign-in until a code from the secret confirms it.
//! - A code is accepted once: the store keeps the last time step used and accepts only later ones.
//! - Wrong codes count as failed sign-ins (the sign-in limits of `app::auth`).
//! - Turning it off needs a current code, or `Permissions.Modify` (an admin helping a user who lost
//!   the device).
//! - The policy (`/policies/mfa`) names groups whose members without two-factor sign-in get an
//!   enroll-only session at sign-in.
//!
//! The secret is kept in the database (the column `users.mfa_secret`), never in logs, events or
//! answers after enrollment's own.

use covm_store::{NewEvent, UserRecord};
use covm_types::api::{MfaDisable, MfaEnrollment, MfaPolicy};
use covm_types::{Error, ErrorCode, ErrorKind, Privilege, ROOT_ID};
use rand::Rng;
use sha2::Digest;
use totp_rs::{Secret, Totp};

use super::{App, Ctx, EventExt};

const POLICY_KEY: &str = "policy.mfa";
const RECOVERY_CODES: usize = 10;

fn totp(user: &str, secret_b32: &str) -> Result<Totp, Error> {
    let secret =
        Secret::try_from_base32(secret_b32).map_err(|_| Error::internal("a stored TOTP secret is not base32"))?;
    totp_rs::Builder::new()
        .with_secret(secret)
        .with_account_name(user)
        .with_issuer(Some("covm"))
        .build()
        .map_err(|e| Error::internal(format!("a TOTP could not be made: {e}")))
}

fn now_s() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp()).unwrap_or(0)
}

/// The time step a code is valid for (now, or one step before or after), if it is valid.
fn code_step(user: &str, secret_b32: &str, code: &str) -> Result<Option<i64>, Error> {
    let code = code.trim();
    if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(None);
    }
    Ok(totp(user, secret_b32)?.check(code, now_s()).and_then(|s| i64::try_from(s).ok()))
}

/// Recovery codes are compared by their SHA-256 (lower-case, without dashes or spaces).
pub(crate) fn recovery_hash(code: &str) -> String {
    let norm: String = code.chars().filter(|c| c.is_ascii_alphanumeric()).map(|c| c.to_ascii_lowercase()).collect();
    hex::encode(sha2::Sha256::digest(norm.as_bytes()))
}

fn recovery_code() -> String {
    const CHARS: &[u8] = b"abcdefghjkmnpqrstuvwxyz23456789";
    let mut rng = rand::rng();
    let s: String = (0..10).map(|_| CHARS[rng.random_range(0..CHARS.len())] as char).collect();
    format!("{}-{}", &s[..5], &s[5..])
}

/// A wrong, used or late code: 401 at sign-in (`signin`), else 400 (the caller's session is fine).
fn invalid_as(signin: bool) -> Error {
    let kind = if signin { ErrorKind::Unauthenticated } else { ErrorKind::InvalidRequest };
    Error::new(kind, ErrorCode::MfaInvalid, "the code is wrong, used already, or out of its time")
}

fn invalid() -> Error {
    invalid_as(false)
}

impl App {
    /// The user named `name`, to be changed by `ctx`: itself, or with `privilege` on the root.
    async fn mfa_target(&self, ctx: &Ctx, name: &str, privilege: Privilege) -> Result<UserRecord, Error> {
        let user = self.user_find(name, "user").await?;
        if user.id != ctx.user_id {
            if ctx.enroll_only {
                return Err(Error::new(
                    ErrorKind::Forbidden,
                    ErrorCode::MfaEnrollmentRequired,
                    "an enroll-only session may enroll only its own user",
                ));
            }
            self.require_global(ctx, privilege).await?;
        }
        Ok(user)
    }

    /// Begins enrollment: a new secret and recovery codes, shown only here.
    pub async fn mfa_enroll(&self, ctx: &Ctx, name: &str) -> Result<MfaEnrollment, Error> {
        let user = self.mfa_target(ctx, name, Privilege::UsersManage).await?;
        if user.mfa_on {
            return Err(Error::conflict(
                ErrorCode::MfaState,
                "two-factor sign-in is already on for this user; turn it off first",
            ));
        }
        // 160 random bits, as RFC 4226 recommends.
        let secret = Secret::from(rand::rng().random::<[u8; 20]>()).to_base32();
        let t = totp(&user.name, &secret)?;
        let otpauth_url = t.to_url().map_err(|e| Error::internal(format!("an otpauth URL could not be made: {e}")))?;
        let codes: Vec<String> = (0..RECOVERY_CODES).map(|_| recovery_code()).collect();
        let hashes: Vec<String> = codes.iter().map(|c| recovery_hash(c)).collect();
        let ev = ctx.event("user.mfa.enrolling", "user", Some(user.id), &user.name).audit_only();
        self.store().user_mfa_begin(user.id, &secret, &hashes, ev).await?;
        Ok(MfaEnrollment { secret, otpauth_url, recovery_codes: codes })
    }

    /// Confirms enrollment with a current code: two-factor sign-in is on from now, and the user's
    /// enroll-only sessions become full ones.
    pub async fn mfa_confirm(&self, ctx: &Ctx, name: &str, code: &str) -> Result<(), Error> {
        let user = self.mfa_target(ctx, name, Privilege::UsersManage).await?;
        let (false, Some(secret)) = (user.mfa_on, user.mfa_secret.as_deref()) else {
            return Err(Error::conflict(
                ErrorCode::MfaState,
                match user.mfa_on {
                    true => "two-factor sign-in is already on for this user",
                    false => "no two-factor enrollment to confirm: enroll first (POST /users/{user}/mfa)",
                },
            ));
        };
        let step = code_step(&user.name, secret, code)?.ok_or_else(|| invalid().with_field("code"))?;
        let ev = ctx.event("user.mfa.enabled", "user", Some(user.id), &user.name).audit_only();
        // The caller's own session, when it is the user's (an admin confirming for a user lifts none).
        let session = (user.id == ctx.user_id).then_some(ctx.token_id);
        self.store().user_mfa_enable(user.id, step, session, ev).await?;
        self.caches().tokens_clear();
        Ok(())
    }

    /// Turns two-factor sign-in off: with a current code, or with `Permissions.Modify`.
    pub async fn mfa_disable(&self, ctx: &Ctx, name: &str, p: MfaDisable) -> Result<(), Error> {
        let user = self.user_find(name, "user").await?;
        match (&p.code, user.mfa_secret.as_deref()) {
            (Some(code), Some(secret)) if user.mfa_on => {
                if user.id != ctx.user_id {
                    self.require_global(ctx, Privilege::UsersManage).await?;
                }
                let step = code_step(&user.name, secret, code)?.ok_or_else(|| invalid().with_field("code"))?;
                if !self.store().user_mfa_step_use(user.id, step).await? {
                    return Err(invalid().with_field("code"));
                }
            }
            _ => self.require_global(ctx, Privilege::PermissionsModify).await?,
        }
        let ev = ctx.event("user.mfa.disabled", "user", Some(user.id), &user.name).audit_only();
        self.store().user_mfa_clear(user.id, ev).await?;
        Ok(())
    }

    /// The second factor of a sign-in, for a user with two-factor sign-in on: `Ok(())` or the error
    /// to answer (the caller counts it as a failed sign-in).
    pub(crate) async fn mfa_check_signin(
        &self,
        user: &UserRecord,
        totp_code: Option<&str>,
        recovery: Option<&str>,
    ) -> Result<(), Error> {
        let secret =
            user.mfa_secret.as_deref().ok_or_else(|| Error::internal("two-factor sign-in without a secret"))?;
        match (totp_code, recovery) {
            (Some(code), _) => match code_step(&user.name, secret, code)? {
                Some(step) if self.store().user_mfa_step_use(user.id, step).await? => Ok(()),
                _ => Err(invalid_as(true).with_field("totp")),
            },
            (None, Some(code)) => match self.store().user_recovery_use(user.id, &recovery_hash(code)).await? {
                true => Ok(()),
                false => Err(invalid_as(true).with_field("recovery_code")),
            },
            (None, None) => Err(Error::new(
                ErrorKind::Unauthenticated,
                ErrorCode::MfaRequired,
                "two-factor sign-in is on for this user: send the current code as totp, or a recovery_code",
            )),
        }
    }

    pub async fn mfa_policy(&self) -> Result<MfaPolicy, Error> {
        Ok(match self.store().meta_get(POLICY_KEY).await? {
            Some(v) => {
                serde_json::from_str(&v).map_err(|_| Error::internal("the stored MFA policy is not readable"))?
            }
            None => MfaPolicy::default(),
        })
    }

    /// Sets which groups must use two-factor sign-in (`Permissions.Modify` on the root).
    pub async fn mfa_policy_set(&self, ctx: &Ctx, p: MfaPolicy) -> Result<MfaPolicy, Error> {
        self.require_global(ctx, Privilege::PermissionsModify).await?;
        let mut groups = p.required_for;
        groups.sort();
        groups.dedup();
        for (i, g) in groups.iter().enumerate() {
            if self.store().group_by_name(g).await?.is_none() {
                return Err(Error::invalid(&format!("required_for[{i}]"), format!("there is no group {g}")));
            }
        }
        let p = MfaPolicy { required_for: groups };
        let value = serde_json::to_string(&p).map_err(|e| Error::internal(e.to_string()))?;
        let ev: NewEvent = ctx
            .event("policy.mfa.changed", "folder", Some(ROOT_ID), "/")
            .scope(ROOT_ID)
            .audit_only()
            .data(serde_json::json!({ "required_for": p.required_for }));
        self.store().meta_set_logged(POLICY_KEY, &value, ev).await?;
        Ok(p)
    }

    /// Whether the policy requires two-factor sign-in of this user (a member of a named group).
    pub(crate) async fn mfa_required_of(&self, user: &UserRecord) -> Result<bool, Error> {
        let policy = self.mfa_policy().await?;
        if policy.required_for.is_empty() {
            return Ok(false);
        }
        let groups = self.store().user_groups(user.id).await?;
        Ok(groups.iter().any(|g| policy.required_for.contains(g)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_6238_test_vector_and_the_window() {
        // RFC 6238 appendix B, SHA-1: secret "12345678901234567890", T = 59 s → 94287082 (8 digits);
        // its last six digits are the 6-digit code.
        let secret = Secret::from(b"12345678901234567890".to_vec()).to_base32();
        let t = totp("u", &secret).unwrap();
        assert_eq!(t.generate(59).to_string(), "287082");
        assert_eq!(t.check("287082", 59), Some(1));
        assert_eq!(t.check("287082", 59 + 30), Some(1), "one step of skew");
        assert_eq!(t.check("287082", 59 + 90), None, "out of the window");
        assert_eq!(code_step("u", &secret, "28708x").unwrap(), None);
    }

    #[test]
    fn recovery_codes_compare_loosely_and_differ() {
        let c = recovery_code();
        assert_eq!(recovery_hash(&c), recovery_hash(&c.to_uppercase().replace('-', " ")));
        assert_ne!(recovery_code(), recovery_code());
    }
}
