//! The hotplug state table (`cpuhp_hp_states[]`): named steps from OFFLINE to ONLINE, each with
//! a startup and a teardown, run in order on the way up and in reverse on the way down.
//!
//! ```text
//!  #  step               section    runs on                 up / down
//!  0  smpcfd:prepare     PREPARE    controller              reset the CPU's IPI state
//!     <user PREPARE>     PREPARE    controller              (teardown = the kernel's DEAD)
//!     bringup:cpu        (none)     controller + AP         start or unpark the thread + handshake /
//!                                                           stop_machine + wait DEAD
//!     <user STARTING>    STARTING   AP, irqs masked         (teardown = DYING, in stop_machine)
//!     ap:online          STARTING   AP, irqs masked         set online (one step) / offline + flush queue
//!     <user ONLINE>      ONLINE     AP, as a job            may sleep, may fail
//!  n  sched:active       ONLINE     controller              active mask + job gate / drain and migrate jobs
//! ```
//!
//! `bringup:cpu` and `ap:online` are built-in steps with no `Section` of their own: user steps
//! go before `bringup:cpu` (PREPARE), between the two (STARTING) or after `ap:online` (ONLINE).
//! STARTING and DYING callbacks run in IPI context (signal-handler rules), as the kernel's run
//! with interrupts disabled.

use std::sync::Arc;

use crate::cpu::mask::CpuId;

/// Where a user step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Section {
    /// On the controlling thread, before the CPU's thread exists (teardown: after it is dead).
    Prepare,
    /// On the new CPU with irqs masked, in IPI context; must not fail (teardown: DYING, inside
    /// stop_machine).
    Starting,
    /// On the new CPU in thread context (a job); may sleep and may fail.
    Online,
}

/// What a step callback returns: `Ok`, or why it failed. A `&'static str`, so that failing (and
/// dropping the error) in IPI context, where STARTING/DYING steps run, never frees memory.
pub type StepResult = Result<(), &'static str>;

/// A step callback, called with the CPU it is for.
pub type StepFn = Arc<dyn Fn(CpuId) -> StepResult + Send + Sync>;

/// Identifies a state added with `setup_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StateId(pub(crate) u64);

/// A step of the table by identity: the built-in steps by name, a user step by the id
/// `setup_state` gave it. Fault injection, the AP's failure report and errors name steps by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StepId {
    /// `smpcfd:prepare`.
    SmpcfdPrepare,
    /// `bringup:cpu`.
    Bringup,
    /// `ap:online`.
    ApOnline,
    /// `sched:active`.
    SchedActive,
    /// A step added with `setup_state`.
    User(StateId),
}

impl std::fmt::Display for StepId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepId::SmpcfdPrepare => f.write_str("smpcfd:prepare"),
            StepId::Bringup => f.write_str("bringup:cpu"),
            StepId::ApOnline => f.write_str("ap:online"),
            StepId::SchedActive => f.write_str("sched:active"),
            StepId::User(StateId(n)) => write!(f, "state #{n}"),
        }
    }
}

#[derive(Clone)]
pub(crate) enum Kind {
    SmpcfdPrepare,
    Bringup,
    ApOnline,
    SchedActive,
    User {
        id: StateId,
        startup: Option<StepFn>,
        teardown: Option<StepFn>,
    },
}

#[derive(Clone)]
pub(crate) struct Step {
    pub name: String,
    pub section: Section,
    pub kind: Kind,
}

impl Step {
    fn builtin(id: StepId, section: Section, kind: Kind) -> Self {
        Step {
            name: id.to_string(),
            section,
            kind,
        }
    }

    /// Which step this is.
    pub(crate) fn id(&self) -> StepId {
        match &self.kind {
            Kind::SmpcfdPrepare => StepId::SmpcfdPrepare,
            Kind::Bringup => StepId::Bringup,
            Kind::ApOnline => StepId::ApOnline,
            Kind::SchedActive => StepId::SchedActive,
            Kind::User { id, .. } => StepId::User(*id),
        }
    }
}

/// The table. Only changed under the hotplug lock.
#[derive(Clone)]
pub(crate) struct Table {
    pub steps: Vec<Step>,
    next_id: u64,
}

impl Table {
    pub(crate) fn new() -> Self {
        Table {
            steps: vec![
                Step::builtin(StepId::SmpcfdPrepare, Section::Prepare, Kind::SmpcfdPrepare),
                Step::builtin(StepId::Bringup, Section::Prepare, Kind::Bringup),
                Step::builtin(StepId::ApOnline, Section::Starting, Kind::ApOnline),
                Step::builtin(StepId::SchedActive, Section::Online, Kind::SchedActive),
            ],
            next_id: 1,
        }
    }

    /// Where step `id` is, if it is in the table.
    pub(crate) fn index(&self, id: StepId) -> Option<usize> {
        self.steps.iter().position(|s| s.id() == id)
    }

    /// The step called `name` (the first, if two user steps share it).
    #[cfg(any(test, feature = "fault-injection"))]
    pub(crate) fn by_name(&self, name: &str) -> Option<StepId> {
        self.steps.iter().find(|s| s.name == name).map(Step::id)
    }

    /// How step `id` is named in messages: its name, or its id if it has left the table.
    pub(crate) fn name_of(&self, id: StepId) -> String {
        self.index(id)
            .map_or_else(|| id.to_string(), |k| self.steps[k].name.clone())
    }

    fn count(&self, section: Section) -> usize {
        self.steps
            .iter()
            .filter(|s| s.section == section && matches!(s.kind, Kind::User { .. }))
            .count()
    }

    /// Index of `bringup:cpu`: after `smpcfd:prepare` and the user PREPARE steps. (Computed
    /// from the layout that `new` and `insert` keep, not searched for.)
    pub(crate) fn bringup(&self) -> usize {
        1 + self.count(Section::Prepare)
    }

    /// Index of `ap:online`: after `bringup:cpu` and the user STARTING steps.
    pub(crate) fn ap_online(&self) -> usize {
        self.bringup() + 1 + self.count(Section::Starting)
    }

    /// Inserts a user step at the end of its section; returns its id and index.
    pub(crate) fn insert(
        &mut self,
        name: &str,
        section: Section,
        startup: Option<StepFn>,
        teardown: Option<StepFn>,
    ) -> (StateId, usize) {
        let id = StateId(self.next_id);
        self.next_id += 1;
        let at = match section {
            Section::Prepare => self.bringup(),
            Section::Starting => self.ap_online(),
            Section::Online => self.steps.len() - 1,
        };
        self.steps.insert(
            at,
            Step {
                name: name.into(),
                section,
                kind: Kind::User {
                    id,
                    startup,
                    teardown,
                },
            },
        );
        (id, at)
    }

    pub(crate) fn find(&self, id: StateId) -> Option<usize> {
        self.steps
            .iter()
            .position(|s| matches!(&s.kind, Kind::User { id: i, .. } if *i == id))
    }

    /// The user STARTING steps, in order (what the AP runs during bring-up).
    pub(crate) fn starting(&self) -> Vec<Step> {
        self.steps[self.bringup() + 1..self.ap_online()].to_vec()
    }

    pub(crate) fn names(&self) -> Vec<String> {
        self.steps.iter().map(|s| s.name.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_steps_land_at_the_end_of_their_section() {
        let mut t = Table::new();
        t.insert("a:prep", Section::Prepare, None, None);
        t.insert("b:start", Section::Starting, None, None);
        let (id, _) = t.insert("c:online", Section::Online, None, None);
        t.insert("d:prep2", Section::Prepare, None, None);
        assert_eq!(
            t.names(),
            [
                "smpcfd:prepare",
                "a:prep",
                "d:prep2",
                "bringup:cpu",
                "b:start",
                "ap:online",
                "c:online",
                "sched:active"
            ]
        );
        assert_eq!(t.find(id), Some(6));
        assert_eq!(t.starting().len(), 1);
        assert_eq!(t.index(StepId::Bringup), Some(t.bringup()));
        assert_eq!(t.index(StepId::ApOnline), Some(t.ap_online()));
        assert_eq!(t.by_name("c:online"), Some(StepId::User(id)));
        assert_eq!(t.by_name("sched:active"), Some(StepId::SchedActive));
        assert_eq!(t.by_name("nope"), None);
    }
}
