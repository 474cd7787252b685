//! The public API follows the Rust API guidelines users rely on: every public type is `Debug`
//! (so `{:?}` of any `Result` the library returns compiles), and errors are
//! `Send + Sync + 'static` (they cross threads and box into `anyhow`/`Box<dyn Error>`).

fn is_debug<T: std::fmt::Debug>() {}
fn is_error<T: std::error::Error + Send + Sync + 'static>() {}

#[test]
fn public_types_are_debug_and_errors_are_send_sync_static() {
    is_debug::<usmp::Runtime>();
    is_debug::<usmp::Handle>();
    is_debug::<usmp::JobHandle<u32>>();
    is_debug::<usmp::KexecOutcome<u32>>();
    is_debug::<usmp::PerCpu<u32>>();
    is_debug::<usmp::Builder>();
    is_error::<usmp::IpiError>();
    is_error::<usmp::HotplugError>();
    is_error::<usmp::StopError>();
    is_error::<usmp::StopMachineError>();
    is_error::<usmp::KexecError>();
    is_error::<usmp::RuntimeError>();
    is_error::<usmp::RecordError>();
    let rt = usmp::Builder::new().cpus(2).build().unwrap();
    let job = rt.run_on(1, || 7u32).unwrap();
    assert!(
        format!("{job:?}").starts_with("JobHandle { cpu: 1"),
        "{job:?}"
    );
    assert_eq!(job.join().unwrap(), 7);
    let dbg = format!("{rt:?}");
    assert!(
        dbg.contains("generation: 0") && dbg.contains("cpus: 2"),
        "{dbg}"
    );
}
