//! Writes SVHN-format MAT v5 files for tests: the unit tests of `svhn.rs` and the integration
//! tests (which include this file by path) share it.

use std::io::Write;
use std::path::Path;

use flate2::{write::ZlibEncoder, Compression};

/// MAT v5 element tag: type, byte count, then the data padded to 8 bytes.
fn element(data_type: u32, data: &[u8]) -> Vec<u8> {
    let mut out = data_type.to_le_bytes().to_vec();
    out.extend((data.len() as u32).to_le_bytes());
    out.extend(data);
    out.resize(out.len().next_multiple_of(8), 0);
    out
}

/// A miMATRIX element: class (mxUINT8 = 9, mxDOUBLE = 6), dimensions, name and the real part
/// stored as `data_type` (miUINT8 = 2, miDOUBLE = 9), per the MAT-file format reference.
pub fn matrix(class: u32, dims: &[i32], name: &str, data_type: u32, data: &[u8]) -> Vec<u8> {
    let mut body = element(6, &[class.to_le_bytes(), 0u32.to_le_bytes()].concat());
    body.extend(element(
        5,
        &dims
            .iter()
            .flat_map(|d| d.to_le_bytes())
            .collect::<Vec<_>>(),
    ));
    body.extend(element(1, name.as_bytes()));
    body.extend(element(data_type, data));
    element(14, &body)
}

/// A MAT v5 file holding X (32×32×3×n uint8, value (h + 2w + 7c + 11i) mod 256) and y (n×1
/// double), each element zlib-compressed (miCOMPRESSED, as MATLAB writes by default) or not.
pub fn write_mat(path: &Path, y: &[f64], compressed: bool) {
    let n = y.len();
    let mut x = Vec::with_capacity(n * 32 * 32 * 3);
    for i in 0..n {
        for c in 0..3 {
            for w in 0..32 {
                for h in 0..32 {
                    x.push(((h + 2 * w + 7 * c + 11 * i) % 256) as u8);
                }
            }
        }
    }
    let mut header = b"MATLAB 5.0 MAT-file, written by the eoss tests".to_vec();
    header.resize(116, b' ');
    header.extend([0u8; 8]);
    header.extend(0x0100u16.to_le_bytes());
    header.extend(b"IM");
    let y_bytes: Vec<u8> = y.iter().flat_map(|v| v.to_le_bytes()).collect();
    for element in [
        matrix(9, &[32, 32, 3, n as i32], "X", 2, &x),
        matrix(6, &[n as i32, 1], "y", 9, &y_bytes),
    ] {
        if compressed {
            let mut enc = ZlibEncoder::new(Vec::new(), Compression::fast());
            enc.write_all(&element).unwrap();
            let packed = enc.finish().unwrap();
            header.extend(15u32.to_le_bytes());
            header.extend((packed.len() as u32).to_le_bytes());
            header.extend(packed);
        } else {
            header.extend(element);
        }
    }
    std::fs::write(path, header).unwrap();
}
