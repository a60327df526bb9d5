//! Every kernel file compiles to PTX with NVRTC in every supported specialisation for sm_80 and sm_90.
//! Needs the `cuda` feature and a loadable NVRTC (`bash .ci/install-nvrtc.sh`, then `ADAQUANT_NVRTC_LIB`);
//! without NVRTC the test says SKIPPED and passes (fails where `ADAQUANT_REQUIRE_NVRTC` is set, as in CI). No GPU is
//! needed.

#![cfg(feature = "cuda")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use adaquant_kernels::cuda::{self, layout::KernelSpec, layout::ARCHS};
use adaquant_kernels::skip::{skip, Need};

#[test]
fn every_kernel_compiles_to_ptx_for_sm80_and_sm90() {
    if let Err(e) = cuda::nvrtc_available() {
        skip(Need::Nvrtc, "every_kernel_compiles_to_ptx_for_sm80_and_sm90", &e.to_string());
        return;
    }
    let jobs: Vec<(KernelSpec, &'static str)> =
        KernelSpec::all().into_iter().flat_map(|s| ARCHS.iter().map(move |&a| (s, a))).collect();
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).min(8);
    std::thread::scope(|sc| {
        for _ in 0..threads {
            sc.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(spec, arch)) = jobs.get(i) else { break };
                match cuda::compile_ptx(&spec, arch) {
                    Ok(ptx) => {
                        for f in spec.functions() {
                            if !ptx.contains(&format!(".entry {f}(")) {
                                failures.lock().unwrap().push(format!("{} {arch}: no entry {f}", spec.name()));
                            }
                        }
                        let target = arch.trim_start_matches("compute_");
                        if !ptx.contains(&format!(".target sm_{target}")) {
                            failures.lock().unwrap().push(format!("{} {arch}: wrong .target", spec.name()));
                        }
                    }
                    Err(e) => failures.lock().unwrap().push(e.to_string()),
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(failures.is_empty(), "{} of {} compiles failed:\n{}", failures.len(), jobs.len(), failures.join("\n"));
    eprintln!("compiled {} programs ({} specialisations x {:?})", jobs.len(), KernelSpec::all().len(), ARCHS);
}
