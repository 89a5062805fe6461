//! The `eoss` binary: enables candle's double backward, runs the command, renders any error with
//! miette and exits 0 (success), 1 (a stage failed), 2 (invalid input) or 3 (a training run
//! diverged).

use std::io::IsTerminal;

use eoss::error::EXIT_OK;

/// mimalloc keeps freed pages for reuse: with the system allocator every training step maps and
/// faults in its large activation buffers afresh (a fifth of a CNN step's time on the CPU).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (index 15 of `mi_option_e` in both its v2 and v3 headers;
/// libmimalloc-sys names no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Tells mimalloc never to return freed memory to the OS, unless `MIMALLOC_PURGE_DELAY` says
/// otherwise. By default it purges freed large blocks within milliseconds, and the next step faults
/// them back in, zeroing every page: 46,000 page faults and a quarter of the time of an HVP of the
/// CNN on 512 samples, 20,000 faults in 30 ResNet-20 steps; with no purging, 2,800 and 630. The
/// process keeps its peak memory until it exits.
fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: an option setter of the allocator, callable at any time (a purge delay only
        // decides when freed memory is returned).
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

/// How many times candle's elementwise-op workers spin before they park, unless
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT` says otherwise (candle's default is 25,000).
const BARRIER_POOL_SPIN_LIMIT: &str = "500";

/// Candle runs elementwise ops of 65,536 elements or more on its own pool of threads, beside the
/// rayon pool that our products and gates use, and its idle workers spin 25,000 times before they
/// park: on 2 cores they take a core from the rayon threads between ops. Parking sooner took the
/// ResNet-20 step at b = 8 from 28–47 ms (mean 36) to 26–34 ms (mean 30) over ten runs each, the
/// conv nets' batch sharpness 3–8 % down, and moved no other case beyond noise (`eoss bench`,
/// session 24). Elementwise results do not depend on the threads, so the bits stay the same.
fn park_idle_elementwise_workers() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", BARRIER_POOL_SPIN_LIMIT);
    }
}

fn main() {
    keep_freed_memory();
    // Like the flag below, read once, when candle first needs it: set while single-threaded.
    park_idle_elementwise_workers();
    // Candle reads this once per thread before its first backward pass; set it while the process is
    // still single-threaded, before anything else runs.
    std::env::set_var("CANDLE_GRAD_DO_NOT_DETACH", "1");
    let code = match eoss::cli::main(std::env::args_os()) {
        Ok(()) => EXIT_OK,
        Err(e) => {
            let terminal = std::io::stderr().is_terminal();
            let _ = miette::set_hook(Box::new(move |_| {
                Box::new(
                    miette::MietteHandlerOpts::new()
                        .force_graphical(true)
                        .color(terminal)
                        .unicode(terminal)
                        .terminal_links(false)
                        .width(if terminal { 100 } else { 120 })
                        .build(),
                )
            }));
            let code = e.exit_code();
            eprintln!("{:?}", miette::Report::new(e));
            code
        }
    };
    std::process::exit(code);
}
