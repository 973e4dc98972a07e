//! Edit leases (DESIGN §4): a user checks a VM out for a while; others' writes get 423 naming the
//! holder. Each new lease gets a fencing token, one more than the VM's last; the holder sends it as
//! `Covm-Lease` with its writes, and a write under a token that is no longer the live lease (expired,
//! released, broken, superseded) is refused with 409 `lease_expired`.
//!
//! Expiry is decided by the store's clock inside the write transaction, so correctness needs no
//! background task. A sweeper still reports expiries to the feed (`vm.lease.expired`) within a second.
//!
//! ```text
//!   (none) ──acquire──▶ held(token t) ──renew──▶ held(t, later expiry)
//!     ▲                   │  │  └─expire (time)──▶ (none) + vm.lease.expired
//!     └──release/break────┘  └─acquire by another after expiry──▶ held(t+1)
//! ```

use chrono::{DateTime, Utc};
use covm_store::{LeaseRecord, LeaseWrite, VmRecord, VmWrite, WriteOutcome};
use covm_types::ErrorCode;
use covm_types::vm::{LeaseRequest, LeaseView};
use covm_types::{Error, ErrorKind, Privilege};
use serde_json::json;
use uuid::Uuid;

use super::{App, Ctx, EventExt, system_event};

pub const TTL_MAX_S: u32 = 3600;

/// Whether a write by `user` (with the lease token it sent, if any) may go ahead under the VM's lease.
pub enum LeaseCheck {
    Ok,
    Refused(Error),
}

fn live(vm: &VmRecord, at: DateTime<Utc>) -> Option<&LeaseRecord> {
    vm.lease.as_ref().filter(|l| l.expires_at > at)
}

fn locked(vm: &VmRecord, l: &LeaseRecord) -> Error {
    Error::new(
        ErrorKind::Locked,
        ErrorCode::Leased,
        format!("{} is leased by {} until {}", vm.object.name, l.holder, l.expires_at.format("%F %T UTC")),
    )
    .with_details(
        serde_json::to_value(covm_types::error::LeasedDetails { holder: l.holder.clone(), expires_at: l.expires_at })
            .unwrap_or_default(),
    )
}

fn expired(vm: &VmRecord, token: i64) -> Error {
    Error::conflict(
        ErrorCode::LeaseExpired,
        format!(
            "your lease on {} (token {token}) has expired, was released or broken, or was taken over; acquire it again",
            vm.object.name
        ),
    )
    .with_details(json!({ "token": token, "current_token": vm.lease.as_ref().map(|l| l.token) }))
}

pub fn lease_check(vm: &VmRecord, user: Uuid, token: Option<i64>, at: DateTime<Utc>) -> LeaseCheck {
    match (live(vm, at), token) {
        (Some(l), _) if l.holder_id != user => LeaseCheck::Refused(locked(vm, l)),
        (Some(l), Some(t)) if l.token != t => LeaseCheck::Refused(expired(vm, t)),
        (None, Some(t)) => LeaseCheck::Refused(expired(vm, t)),
        _ => LeaseCheck::Ok,
    }
}

fn ttl(p: &LeaseRequest) -> Result<chrono::Duration, Error> {
    if !(1..=TTL_MAX_S).contains(&p.ttl_s) {
        return Err(Error::invalid("ttl_s", format!("a lease lasts 1 to {TTL_MAX_S} seconds")));
    }
    Ok(chrono::Duration::seconds(p.ttl_s as i64))
}

fn lease_view(l: &LeaseRecord) -> LeaseView {
    LeaseView { holder: l.holder.clone(), acquired_at: l.acquired_at, expires_at: l.expires_at, token: Some(l.token) }
}

fn lease_data(l: &LeaseRecord) -> serde_json::Value {
    json!({ "holder": l.holder, "token": l.token, "expires_at": l.expires_at })
}

impl App {
    pub async fn lease_get(&self, ctx: &Ctx, vm: &str) -> Result<Option<LeaseView>, Error> {
        let rec = self.vm_resolve(ctx, vm).await?;
        Ok(self.vm_view(Some(ctx), &rec)?.lease)
    }

    /// Takes the lease, or extends one the caller already holds (same token).
    pub async fn lease_acquire(&self, ctx: &Ctx, vm: &str, p: LeaseRequest) -> Result<LeaseView, Error> {
        let ttl = ttl(&p)?;
        let rec = self.vm_resolve(ctx, vm).await?;
        self.require(ctx, &rec.object, Privilege::VmConfigEdit).await?;
        let ctx2 = ctx.clone();
        let write = Box::new(move |vm: &VmRecord, at: DateTime<Utc>| {
            let name = vm.object.name.as_str();
            let mut events = Vec::new();
            let lease = match live(vm, at) {
                Some(l) if l.holder_id != ctx2.user_id => return Err(locked(vm, l)),
                Some(l) => {
                    let l = LeaseRecord { expires_at: at + ttl, ..l.clone() };
                    events.push(ctx2.event("vm.lease.renewed", "vm", Some(vm.object.id), name).data(lease_data(&l)));
                    l
                }
                None => {
                    if let Some(old) = &vm.lease {
                        events
                            .push(ctx2.event("vm.lease.expired", "vm", Some(vm.object.id), name).data(lease_data(old)));
                    }
                    let l = LeaseRecord {
                        holder_id: ctx2.user_id,
                        holder: ctx2.user.clone(),
                        token: vm.lease_fence + 1,
                        acquired_at: at,
                        expires_at: at + ttl,
                    };
                    events.push(ctx2.event("vm.lease.acquired", "vm", Some(vm.object.id), name).data(lease_data(&l)));
                    l
                }
            };
            Ok(WriteOutcome::from(VmWrite { lease: Some(LeaseWrite::Set(lease)), events, ..Default::default() }))
        });
        let (after, _) = self.store().vm_write(rec.object.id, write).await?.done()?;
        self.committed();
        self.presence_lease_changed(rec.object.id).await;
        let l = after.and_then(|a| a.lease).ok_or_else(|| Error::internal("the lease could not be read back"))?;
        Ok(lease_view(&l))
    }

    /// Extends the caller's live lease; a lease that is gone cannot be renewed.
    pub async fn lease_renew(
        &self,
        ctx: &Ctx,
        vm: &str,
        p: LeaseRequest,
        token: Option<i64>,
    ) -> Result<LeaseView, Error> {
        let ttl = ttl(&p)?;
        let rec = self.vm_resolve(ctx, vm).await?;
        let ctx2 = ctx.clone();
        let write = Box::new(move |vm: &VmRecord, at: DateTime<Utc>| match live(vm, at) {
            Some(l) if l.holder_id != ctx2.user_id => Err(locked(vm, l)),
            Some(l) if token.is_some_and(|t| t != l.token) => Err(expired(vm, token.unwrap_or_default())),
            Some(l) => {
                let l = LeaseRecord { expires_at: at + ttl, ..l.clone() };
                let ev = ctx2.event("vm.lease.renewed", "vm", Some(vm.object.id), &vm.object.name).data(lease_data(&l));
                Ok(WriteOutcome::from(VmWrite {
                    lease: Some(LeaseWrite::Set(l)),
                    events: vec![ev],
                    ..Default::default()
                }))
            }
            None => Err(expired(vm, token.or(vm.lease.as_ref().map(|l| l.token)).unwrap_or_default())),
        });
        let (after, _) = self.store().vm_write(rec.object.id, write).await?.done()?;
        self.committed();
        let l = after.and_then(|a| a.lease).ok_or_else(|| Error::internal("the lease could not be read back"))?;
        Ok(lease_view(&l))
    }

    /// Releases the caller's lease, or with `force` breaks anyone's (needs `VirtualMachine.Lease.Break`;
    /// the holder learns of it through the feed). Releasing a lease that is not there is success.
    pub async fn lease_release(&self, ctx: &Ctx, vm: &str, force: bool) -> Result<(), Error> {
        let rec = self.vm_resolve(ctx, vm).await?;
        if force {
            self.require(ctx, &rec.object, Privilege::VmLeaseBreak).await?;
        }
        let ctx2 = ctx.clone();
        let write = Box::new(move |vm: &VmRecord, at: DateTime<Utc>| {
            let name = vm.object.name.as_str();
            let kind = match (live(vm, at), &vm.lease) {
                (Some(l), _) if l.holder_id == ctx2.user_id => "vm.lease.released",
                (Some(_), _) if force => "vm.lease.broken",
                (Some(l), _) => return Err(locked(vm, l)),
                (None, Some(_)) => "vm.lease.expired",
                (None, None) => return Ok(WriteOutcome::Unchanged),
            };
            let old = vm.lease.as_ref().expect("a lease is there in every arm that gets here");
            let mut data = lease_data(old);
            if kind == "vm.lease.broken" {
                data["broken_by"] = json!(ctx2.user);
            }
            let ev = ctx2.event(kind, "vm", Some(vm.object.id), name).data(data);
            Ok(WriteOutcome::from(VmWrite { lease: Some(LeaseWrite::Clear), events: vec![ev], ..Default::default() }))
        });
        self.store().vm_write(rec.object.id, write).await?.done()?;
        self.committed();
        self.presence_lease_changed(rec.object.id).await;
        Ok(())
    }

    /// Reports (and clears) leases that expired; run every second by the server.
    pub async fn leases_expire(&self) -> Result<usize, Error> {
        let ids = self.store().vm_leases_expired(Utc::now()).await?;
        let mut n = 0;
        for id in ids {
            let write = Box::new(move |vm: &VmRecord, at: DateTime<Utc>| match &vm.lease {
                Some(l) if l.expires_at <= at => {
                    let ev =
                        system_event("vm.lease.expired", "vm", Some(vm.object.id), &vm.object.name).data(lease_data(l));
                    Ok(WriteOutcome::from(VmWrite {
                        lease: Some(LeaseWrite::Clear),
                        events: vec![ev],
                        ..Default::default()
                    }))
                }
                _ => Ok(WriteOutcome::Unchanged),
            });
            match self.store().vm_write(id, write).await {
                Ok(w) => n += w.done()?.1.len(),
                Err(e) if e.kind == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        if n > 0 {
            self.committed();
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use covm_store::ObjectRecord;
    use covm_types::api::ObjectKind;

    fn vm(lease: Option<LeaseRecord>) -> VmRecord {
        VmRecord {
            object: ObjectRecord {
                id: Uuid::nil(),
                kind: ObjectKind::Vm,
                name: "web-1".into(),
                parent_id: None,
                path: "/web-1".into(),
                spec: json!({}),
                created_at: Utc::now(),
            },
            version: 1,
            config: json!({}),
            power_state: covm_types::vm::PowerState::Off,
            runtime: json!({}),
            generation: 0,
            lease_fence: lease.as_ref().map_or(0, |l| l.token),
            lease,
        }
    }

    #[test]
    fn expiry_is_decided_by_the_time_of_the_request() {
        let (alice, bob) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let t0 = Utc::now();
        let l = LeaseRecord {
            holder_id: alice,
            holder: "alice".into(),
            token: 7,
            acquired_at: t0,
            expires_at: t0 + chrono::Duration::seconds(10),
        };
        let v = vm(Some(l));
        let before = t0 + chrono::Duration::seconds(5);
        let after = t0 + chrono::Duration::seconds(11);
        let code = |c: LeaseCheck| match c {
            LeaseCheck::Ok => "ok".to_owned(),
            LeaseCheck::Refused(e) => e.code.to_string(),
        };
        assert_eq!(code(lease_check(&v, bob, None, before)), "leased");
        assert_eq!(code(lease_check(&v, alice, Some(7), before)), "ok");
        assert_eq!(code(lease_check(&v, alice, None, before)), "ok");
        assert_eq!(code(lease_check(&v, alice, Some(6), before)), "lease_expired");
        // The same stored row, a second after its expiry: nobody needed to clear it.
        assert_eq!(code(lease_check(&v, bob, None, after)), "ok");
        assert_eq!(code(lease_check(&v, alice, Some(7), after)), "lease_expired");
        assert_eq!(code(lease_check(&vm(None), alice, Some(7), before)), "lease_expired");
    }
}
