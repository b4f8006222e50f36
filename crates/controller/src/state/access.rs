//! Secrets that grant access: join tokens (a host's first connection) and tenant
//! credentials (the API, for one tenant): creation, listing, revocation and checks.

use std::collections::BTreeMap;

use vane_proto::validate;

use super::{ApiError, State};
use crate::enroll::{self, TokenRecord};
use crate::store::Batch;

impl State {
    /// A join token valid for `ttl_secs` from `now`, spent by the first host that joins
    /// with it unless `reusable`. Expired tokens are forgotten. Returns the token, its
    /// expiry and its id.
    pub fn create_token(
        &mut self,
        ttl_secs: u64,
        reusable: bool,
        now: u64,
    ) -> Result<(String, u64, String, Batch), ApiError> {
        if ttl_secs == 0 || ttl_secs > 365 * 24 * 3600 {
            return Err(ApiError::BadRequest(
                "token lifetime must be between 1 second and 365 days".into(),
            ));
        }
        let mut batch = Batch::default();
        let expired: Vec<TokenRecord> = self
            .tokens
            .values()
            .filter(|t| t.expires <= now)
            .cloned()
            .collect();
        for t in expired {
            self.tokens.remove(&t.hash);
            batch.delete(&t);
        }
        let token = enroll::new_token();
        let record = TokenRecord {
            hash: enroll::hash(&token),
            expires: now + ttl_secs,
            single_use: !reusable,
        };
        batch.put(&record);
        self.tokens.insert(record.hash.clone(), record.clone());
        Ok((token, record.expires, record.id().to_string(), batch))
    }

    /// Join tokens still valid at `now`, soonest to expire first.
    pub fn tokens(&self, now: u64) -> Vec<vane_proto::api::TokenInfo> {
        let mut list: Vec<_> = self
            .tokens
            .values()
            .filter(|t| t.expires > now)
            .map(|t| vane_proto::api::TokenInfo {
                id: t.id().to_string(),
                expires: t.expires,
                single_use: t.single_use,
            })
            .collect();
        list.sort_by(|a, b| (a.expires, &a.id).cmp(&(b.expires, &b.id)));
        list
    }

    /// A credential for `tenant`, valid for `ttl_secs` from `now` (or until revoked).
    pub fn create_credential(
        &mut self,
        tenant: &str,
        ttl_secs: Option<u64>,
        now: u64,
    ) -> Result<(vane_proto::api::TenantCredential, Batch), ApiError> {
        validate::name("tenant", tenant)?;
        if ttl_secs.is_some_and(|t| t == 0 || t > 10 * 365 * 24 * 3600) {
            return Err(ApiError::BadRequest(
                "credential lifetime must be between 1 second and 10 years".into(),
            ));
        }
        let (secret, record) =
            crate::auth::new_tenant_credential(tenant, ttl_secs.map(|t| now + t));
        let mut batch = Batch::default();
        batch.put(&record);
        let info = record.info();
        self.credentials.insert(record.hash.clone(), record);
        Ok((
            vane_proto::api::TenantCredential {
                credential: secret,
                info,
            },
            batch,
        ))
    }

    /// Tenant credentials still valid at `now`.
    pub fn credentials(&self, now: u64) -> Vec<vane_proto::api::CredentialInfo> {
        let mut list: Vec<_> = self
            .credentials
            .values()
            .filter(|c| c.expires.is_none_or(|e| e > now))
            .map(|c| c.info())
            .collect();
        list.sort_by(|a, b| (&a.tenant, &a.id).cmp(&(&b.tenant, &b.id)));
        list
    }

    /// Revokes the tenant credential whose id is `id`.
    pub fn revoke_credential(&mut self, id: &str) -> Result<Batch, ApiError> {
        remove_by_id(&mut self.credentials, id, |c| c.id(), "credential")
    }

    /// The tenant whose valid credential `secret` is.
    pub fn tenant_of(&self, secret: &str, now: u64) -> Option<String> {
        self.credentials
            .get(&enroll::hash(secret))
            .filter(|c| c.expires.is_none_or(|e| e > now))
            .map(|c| c.tenant.clone())
    }

    /// Revokes the join token whose id is `id`: no host joins with it any more.
    pub fn revoke_token(&mut self, id: &str) -> Result<Batch, ApiError> {
        remove_by_id(&mut self.tokens, id, |t| t.id(), "join token")
    }
}

/// Removes from `records` (secrets' records by hash) the one whose id (`id_of`) is `id`;
/// `what` names its kind in the error.
fn remove_by_id<R: crate::store::Record>(
    records: &mut BTreeMap<String, R>,
    id: &str,
    id_of: impl Fn(&R) -> &str,
    what: &str,
) -> Result<Batch, ApiError> {
    let key = records
        .iter()
        .find(|(_, r)| id_of(r) == id)
        .map(|(k, _)| k.clone())
        .ok_or_else(|| ApiError::NotFound(format!("unknown {what} {id:?}")))?;
    let mut batch = Batch::default();
    if let Some(r) = records.remove(&key) {
        batch.delete(&r);
    }
    Ok(batch)
}
