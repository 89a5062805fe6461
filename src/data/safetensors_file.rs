//! The on-disk form of a [`Dataset`]: one safetensors file that PyTorch's `safetensors.torch.load_file`
//! reads, with byte-identical output for identical contents.
//!
//! The `safetensors` crate writes its `__metadata__` map in `HashMap` order, which changes from process
//! to process; [`save`] therefore re-emits the JSON header with its keys sorted (same length, so the
//! data offsets are untouched).

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use super::{DataError, Dataset, LabelEncoding};

/// Length of the little-endian u64 that opens a safetensors file.
const HEADER_LEN_BYTES: usize = 8;

pub(super) fn save(data: &Dataset, path: &Path, source: &str) -> Result<(), DataError> {
    let n = data.len();
    let image_bytes: Vec<u8> = data.images.iter().flat_map(|v| v.to_le_bytes()).collect();
    let label_bytes: Vec<u8> = data.labels.iter().flat_map(|v| v.to_le_bytes()).collect();
    let index_bytes: Vec<u8> = data
        .source_indices
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let tensors = vec![
        (
            "images",
            view(path, Dtype::F32, data.shape.to_vec(), &image_bytes)?,
        ),
        ("labels", view(path, Dtype::I64, vec![n], &label_bytes)?),
        (
            "source_indices",
            view(path, Dtype::I64, vec![n], &index_bytes)?,
        ),
    ];
    let metadata = HashMap::from([
        ("num_classes".to_string(), data.num_classes.to_string()),
        ("encoding".to_string(), data.encoding.as_str().to_string()),
        ("source".to_string(), source.to_string()),
    ]);
    let mut bytes = safetensors::serialize(tensors, Some(metadata))
        .map_err(|e| DataError::malformed(path, format!("cannot serialise the dataset: {e}")))?;
    canonicalize_header(&mut bytes)
        .map_err(|message| DataError::malformed(path, format!("safetensors header: {message}")))?;
    std::fs::write(path, bytes).map_err(|e| DataError::io(path, e))
}

/// A view of `bytes` as a tensor, or an error naming the file being written.
fn view<'a>(
    path: &Path,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: &'a [u8],
) -> Result<TensorView<'a>, DataError> {
    TensorView::new(dtype, shape, bytes)
        .map_err(|e| DataError::malformed(path, format!("cannot describe a tensor: {e}")))
}

/// Rewrites the JSON header of serialised safetensors bytes with every object's keys sorted.
fn canonicalize_header(bytes: &mut [u8]) -> Result<(), String> {
    let len_bytes: [u8; HEADER_LEN_BYTES] = bytes
        .get(..HEADER_LEN_BYTES)
        .and_then(|b| b.try_into().ok())
        .ok_or("file shorter than its length prefix")?;
    let header_len = u64::from_le_bytes(len_bytes) as usize;
    let header = bytes
        .get_mut(HEADER_LEN_BYTES..HEADER_LEN_BYTES + header_len)
        .ok_or("header longer than the file")?;
    let mut value: serde_json::Value = serde_json::from_slice(header).map_err(|e| e.to_string())?;
    value.sort_all_objects();
    let sorted = serde_json::to_vec(&value).map_err(|e| e.to_string())?;
    if sorted.len() > header.len() {
        return Err("sorted header does not fit in place".into());
    }
    header[..sorted.len()].copy_from_slice(&sorted);
    header[sorted.len()..].fill(b' ');
    Ok(())
}

pub(super) fn load(path: &Path) -> Result<Dataset, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let bad = |message: String| DataError::malformed(path, message);
    let file = SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let meta = |key: &str| {
        metadata
            .get(key)
            .ok_or_else(|| bad(format!("metadata `{key}` missing (not written by eoss?)")))
    };
    let num_classes: usize = meta("num_classes")?
        .parse()
        .map_err(|e| bad(format!("metadata `num_classes`: {e}")))?;
    let encoding_name = meta("encoding")?;
    let encoding = LabelEncoding::from_name(encoding_name).ok_or_else(|| {
        bad(format!(
            "metadata `encoding` is `{encoding_name}`, expected `one_hot` or `plus_minus_one`"
        ))
    })?;

    let tensor = |name: &str, dtype: Dtype, rank: usize| {
        let view = file
            .tensor(name)
            .map_err(|_| bad(format!("tensor `{name}` missing")))?;
        if view.dtype() != dtype || view.shape().len() != rank {
            return Err(bad(format!(
                "tensor `{name}` is {:?} {:?}, expected {dtype:?} of rank {rank}",
                view.dtype(),
                view.shape()
            )));
        }
        Ok(view)
    };
    let images = tensor("images", Dtype::F32, 4)?;
    let labels = tensor("labels", Dtype::I64, 1)?;
    let indices = tensor("source_indices", Dtype::I64, 1)?;
    let shape: [usize; 4] = images
        .shape()
        .try_into()
        .map_err(|_| bad("images: rank".into()))?;
    if labels.shape()[0] != shape[0] || indices.shape()[0] != shape[0] {
        return Err(bad(format!(
            "{} images but {} labels and {} source indices",
            shape[0],
            labels.shape()[0],
            indices.shape()[0]
        )));
    }
    let images: Vec<f32> = images
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let as_i64 = |view: TensorView| -> Vec<i64> {
        view.data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            .collect()
    };
    let labels = as_i64(labels);
    let source_indices = as_i64(indices);
    if encoding == LabelEncoding::PlusMinusOne && num_classes != 2 {
        return Err(bad(format!(
            "encoding `plus_minus_one` with {num_classes} classes, expected 2"
        )));
    }
    if let Some(bad_label) = labels.iter().find(|&&l| l < 0 || l as usize >= num_classes) {
        return Err(bad(format!("label {bad_label} outside 0..{num_classes}")));
    }
    Ok(Dataset {
        images,
        shape,
        labels,
        num_classes,
        encoding,
        source_indices,
    })
}
