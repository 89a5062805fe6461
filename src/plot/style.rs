//! The paper's visual conventions: which colour and mark each measured quantity gets, its legend
//! name, and which y axis it goes on (the loss on a log twin axis).

use super::figure::{Mark, Style};

/// Batch sharpness: green line.
pub const GREEN: (u8, u8, u8) = (34, 139, 34);
/// λmax: blue line.
pub const BLUE: (u8, u8, u8) = (31, 119, 180);
/// Step sharpness: red dots.
pub const RED: (u8, u8, u8) = (214, 39, 40);
/// The 2/η threshold: black dashes.
pub const BLACK: (u8, u8, u8) = (0, 0, 0);
/// The full-batch loss: grey.
pub const GREY: (u8, u8, u8) = (110, 110, 110);
/// Light grey: the noisy mini-batch loss, under the darker full-batch loss.
pub const LIGHT_GREY: (u8, u8, u8) = (170, 170, 170);

/// Colours for quantities without a fixed colour and for sweep groups, in order.
pub const CYCLE: [(u8, u8, u8); 6] = [
    (255, 127, 14),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (23, 190, 207),
    (188, 189, 34),
];

/// Legend name of a metrics column (the column name itself when it has no special name).
pub fn display_name(column: &str) -> String {
    match column {
        "batch_sharpness" => "Batch Sharpness",
        "lambda_max" => "λmax",
        "step_sharpness" => "Step Sharpness",
        "gni" => "GNI",
        "gni_windowed" => "GNI (windowed)",
        "ias" => "IAS",
        "loss" => "Train loss (batch)",
        "full_loss" => "Train loss",
        "test_loss" => "Test loss",
        "full_accuracy" => "Train accuracy",
        "test_accuracy" => "Test accuracy",
        "lambda_max_b" => "λmax^b",
        "step_lambda_max_b" => "λmax^b (live batch)",
        "batch_sharpness_modified" => "Modified Batch Sharpness",
        "hessian_trace" => "Hessian trace",
        "lambda_max_gn" => "λmax (Gauss–Newton)",
        "batch_sharpness_gn" => "Batch Sharpness (Gauss–Newton)",
        "lambda_max_b_gn" => "λmax^b (Gauss–Newton)",
        "smc_eq37" => "λmax(E[(I − ηH_B)²])",
        "smc_eq39" => "λmax(−2ηH + η²E[H_B²])",
        "grad_norm_sq" => "‖∇L‖²",
        "lr" => "step size η",
        other => other,
    }
    .to_string()
}

/// Style of a metrics column; `index` picks a colour from [`CYCLE`] for columns without one.
pub fn column_style(column: &str, index: usize) -> Style {
    let (color, mark) = match column {
        "batch_sharpness" => (GREEN, Mark::Line),
        "lambda_max" => (BLUE, Mark::Line),
        "step_sharpness" | "step_lambda_max_b" => (RED, Mark::Dots),
        "full_loss" => (GREY, Mark::Line),
        "loss" => (LIGHT_GREY, Mark::Line),
        _ => (CYCLE[index % CYCLE.len()], Mark::Line),
    };
    Style { color, mark }
}

/// Style of the dashed 2/η line.
pub fn threshold_style() -> Style {
    Style {
        color: BLACK,
        mark: Mark::Dashed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_batch_and_mini_batch_losses_are_told_apart() {
        let (full, batch) = (column_style("full_loss", 0), column_style("loss", 1));
        assert_ne!(full.color, batch.color);
        assert_eq!(column_style("lambda_max", 0).color, BLUE);
    }
}
