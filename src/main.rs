//! The `eoss` binary: enables candle's double backward, runs the command, renders any error with
//! miette and exits 0 (success), 1 (a stage failed) or 2 (invalid input).

use std::io::IsTerminal;

use eoss::error::EXIT_OK;

/// mimalloc keeps freed pages for reuse: with the system allocator every training step maps and
/// faults in its large activation buffers afresh (a fifth of a CNN step's time on the CPU).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
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
