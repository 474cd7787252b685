//! "Which CPU am I?" and the soft irq mask, as the runtime's users see them. They live in the
//! bottom layer (`cpu/context.rs`), where every layer can reach them.

pub use crate::cpu::context::{
    cpu_relax, irq_restore, irq_save, irqs_disabled, this_cpu, IrqFlags,
};
