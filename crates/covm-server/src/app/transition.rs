//! The one table of power transitions. Power requests (`POST /vms/{vm}/power`), autostart, the
//! supervisor of a running VM and recovery after covm's restart all move a VM's power state through
//! [`power_transition`]; nothing else decides what follows what.

use covm_types::vm::PowerState;

/// What happens to a VM's power: a request, or a fact the hypervisor reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerEvent {
    /// A power-on is asked (by a user or by autostart): the VM is claimed for a start.
    Start,
    /// QEMU started and answers (a fact: a stale report is kept out by the run's generation).
    Started,
    /// QEMU could not be started (a fact).
    StartFailed,
    /// The guest paused, or was resumed.
    Paused,
    Resumed,
    /// A reset is asked.
    Reset,
    /// A power-off or a shutdown is asked (QEMU is told; the state moves when it has stopped).
    Stop,
    /// QEMU ended as asked, or the guest powered off.
    Stopped,
    /// QEMU ended by itself.
    Exited,
    /// covm found the VM's QEMU still running after its own restart.
    Adopted,
    /// covm found the VM's QEMU gone after its own restart.
    Lost,
    /// A crashed VM is cleared to off (a power-off of a crashed VM).
    Clear,
}

/// The state after `event` in state `from`, or None when the event does not apply there (a power-on
/// of a running VM, a reset of one that is off …). Facts about QEMU (stopped, exited) apply in any
/// state: they say what is.
pub fn power_transition(from: PowerState, event: PowerEvent) -> Option<PowerState> {
    use PowerEvent as E;
    use PowerState::*;
    let active = from.is_active();
    match event {
        E::Start => (!active).then_some(Starting),
        E::Started => Some(Running),
        E::StartFailed => Some(Off),
        E::Paused => matches!(from, Running | Paused).then_some(Paused),
        E::Resumed => matches!(from, Running | Paused).then_some(Running),
        E::Reset => matches!(from, Running | Paused).then_some(from),
        E::Stop => active.then_some(from),
        E::Stopped => Some(Off),
        E::Exited => Some(Crashed),
        E::Adopted => active.then_some(Running),
        E::Lost => active.then_some(Crashed),
        E::Clear => (from == Crashed).then_some(Off),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PowerEvent as E;
    use PowerState::*;

    const STATES: [PowerState; 6] = [Off, Starting, Running, Paused, Stopping, Crashed];

    #[test]
    fn a_vm_starts_only_from_off_or_crashed_and_runs_once_started() {
        for s in STATES {
            assert_eq!(power_transition(s, E::Start).is_some(), matches!(s, Off | Crashed), "{s}");
        }
        assert_eq!(power_transition(Starting, E::Started), Some(Running));
        assert_eq!(power_transition(Starting, E::StartFailed), Some(Off));
    }

    #[test]
    fn facts_apply_everywhere_and_requests_only_where_they_mean_something() {
        for s in STATES {
            assert_eq!(power_transition(s, E::Stopped), Some(Off));
            assert_eq!(power_transition(s, E::Exited), Some(Crashed));
            assert_eq!(power_transition(s, E::Reset).is_some(), matches!(s, Running | Paused));
            assert_eq!(power_transition(s, E::Stop).is_some(), s.is_active());
            assert_eq!(power_transition(s, E::Clear), (s == Crashed).then_some(Off));
            assert_eq!(power_transition(s, E::Adopted), s.is_active().then_some(Running));
            assert_eq!(power_transition(s, E::Lost), s.is_active().then_some(Crashed));
        }
        assert_eq!(power_transition(Running, E::Paused), Some(Paused));
        assert_eq!(power_transition(Paused, E::Resumed), Some(Running));
    }
}
