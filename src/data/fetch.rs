//! Downloading the official files of a collection (`eoss fetch`): each file from its official address,
//! checked against its published MD5 before it is put in place, so a folder never holds a truncated or
//! altered file. CIFAR-10 comes as one archive, from which the binary batches are extracted.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use md5::{Digest, Md5};

use super::source::SourceKind;
use super::DataError;

/// One file to download.
struct Resource {
    /// Address relative to the collection's base URL.
    name: &'static str,
    /// Published MD5 (hex) of the downloaded file.
    md5: &'static str,
}

/// Official base URL and files of a collection (MD5s as published by the authors, and as
/// torchvision checks them). `None` for the generated `synthetic` source.
fn official(source: SourceKind) -> Option<(&'static str, &'static [Resource])> {
    match source {
        SourceKind::Cifar10 => Some((
            "https://www.cs.toronto.edu/~kriz/",
            &[Resource {
                name: "cifar-10-binary.tar.gz",
                md5: "c32a1d4ab5d03f1284b67883e8d87530",
            }],
        )),
        SourceKind::FashionMnist => Some((
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            &[
                Resource {
                    name: "train-images-idx3-ubyte.gz",
                    md5: "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                },
                Resource {
                    name: "train-labels-idx1-ubyte.gz",
                    md5: "25c81989df183df01b3e8a0aad5dffbe",
                },
                Resource {
                    name: "t10k-images-idx3-ubyte.gz",
                    md5: "bef4ecab320f06d8554ea6380940ec79",
                },
                Resource {
                    name: "t10k-labels-idx1-ubyte.gz",
                    md5: "bb300cfdad3c16e7a12a480ee83cd310",
                },
            ],
        )),
        SourceKind::Svhn => Some((
            "http://ufldl.stanford.edu/housenumbers/",
            &[
                Resource {
                    name: "train_32x32.mat",
                    md5: "e26dedcc434d2e4c54c9b2d4a06d8373",
                },
                Resource {
                    name: "test_32x32.mat",
                    md5: "eb5a983be6a315427106f1b164d9cef3",
                },
            ],
        )),
        SourceKind::Synthetic => None,
    }
}

fn io_error(file: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        file: file.to_path_buf(),
        source,
    }
}

/// MD5 (hex) of a file.
fn md5_of(path: &Path) -> Result<String, DataError> {
    let mut file = File::open(path).map_err(io_error(path))?;
    let mut hasher = Md5::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(io_error(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// Downloads `url` to `target` through a hidden partial file, checks its MD5, then renames it.
fn download(url: &str, target: &Path, md5: &str) -> Result<(), DataError> {
    let partial = target.with_file_name(format!(
        ".{}.partial",
        target
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("download")
    ));
    let failed = |message: String| DataError::Malformed {
        file: target.to_path_buf(),
        message,
    };
    let response = ureq::get(url)
        .call()
        .map_err(|e| failed(format!("downloading {url}: {e}")))?;
    let mut body = response.into_body().into_reader();
    let mut file = File::create(&partial).map_err(io_error(&partial))?;
    std::io::copy(&mut body, &mut file).map_err(io_error(&partial))?;
    file.flush().map_err(io_error(&partial))?;
    drop(file);
    let got = md5_of(&partial)?;
    if got != md5 {
        let _ = std::fs::remove_file(&partial);
        return Err(failed(format!(
            "downloaded from {url} with MD5 {got}, expected {md5}; nothing was kept"
        )));
    }
    std::fs::rename(&partial, target).map_err(io_error(target))
}

/// Extracts the CIFAR-10 binary batches from the official archive into `dir`.
fn extract_cifar(archive: &Path, dir: &Path) -> Result<(), DataError> {
    let file = File::open(archive).map_err(io_error(archive))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let bad = |e: std::io::Error| DataError::Malformed {
        file: archive.to_path_buf(),
        message: e.to_string(),
    };
    for entry in tar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let path = entry.path().map_err(bad)?.into_owned();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if name.ends_with(".bin") || name == "batches.meta.txt" {
            let target = dir.join(&name);
            let partial = dir.join(format!(".{name}.partial"));
            entry.unpack(&partial).map_err(bad)?;
            std::fs::rename(&partial, &target).map_err(io_error(&target))?;
        }
    }
    Ok(())
}

/// Downloads `source`'s official files into `dir` (from `base_url` instead of the official address
/// when given, e.g. a mirror), skipping files already there with the right MD5. Returns the files
/// now in place.
pub fn fetch(
    source: SourceKind,
    dir: &Path,
    base_url: Option<&str>,
) -> Result<Vec<PathBuf>, DataError> {
    let (official_base, resources) = official(source).ok_or(DataError::Invalid {
        field: "source",
        message: "the synthetic source is generated, there is nothing to download".into(),
    })?;
    fetch_resources(source, resources, base_url.unwrap_or(official_base), dir)
}

/// Downloads `resources` from `base` into `dir` (CIFAR-10's archive is extracted and removed).
fn fetch_resources(
    source: SourceKind,
    resources: &[Resource],
    base: &str,
    dir: &Path,
) -> Result<Vec<PathBuf>, DataError> {
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    let mut placed = Vec::new();
    for resource in resources {
        let target = dir.join(resource.name);
        let present = target.is_file() && md5_of(&target)? == resource.md5;
        if !present {
            download(
                &format!("{}/{}", base.trim_end_matches('/'), resource.name),
                &target,
                resource.md5,
            )?;
        }
        if source == SourceKind::Cifar10 {
            extract_cifar(&target, dir)?;
            std::fs::remove_file(&target).map_err(io_error(&target))?;
            placed.extend(
                source
                    .file_names(super::source::Split::Train)
                    .iter()
                    .map(|f| dir.join(f)),
            );
            placed.extend(
                source
                    .file_names(super::source::Split::Test)
                    .iter()
                    .map(|f| dir.join(f)),
            );
        } else {
            placed.push(target);
        }
    }
    Ok(placed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Serves `files` (name → bytes) on 127.0.0.1; returns the base URL and a request counter.
    fn mirror(files: Vec<(String, Vec<u8>)>) -> (String, Arc<AtomicUsize>) {
        let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", server.server_addr().to_ip().unwrap());
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        std::thread::spawn(move || {
            for request in server.incoming_requests() {
                counter.fetch_add(1, Ordering::SeqCst);
                let name = request.url().trim_start_matches('/').to_string();
                let response = match files.iter().find(|(n, _)| *n == name) {
                    Some((_, body)) => tiny_http::Response::from_data(body.clone()),
                    None => tiny_http::Response::from_data(Vec::new()).with_status_code(404),
                };
                let _ = request.respond(response);
            }
        });
        (url, requests)
    }

    fn leak(s: String) -> &'static str {
        Box::leak(s.into_boxed_str())
    }

    #[test]
    fn md5_matches_a_known_digest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("abc");
        std::fs::write(&path, b"abc").unwrap();
        assert_eq!(md5_of(&path).unwrap(), "900150983cd24fb0d6963f7d28e17f72"); // RFC 1321
    }

    #[test]
    fn files_land_checked_are_not_fetched_twice_and_corrupted_ones_are_refused() {
        let bodies: Vec<(String, Vec<u8>)> = (0..2)
            .map(|i| (format!("file{i}.gz"), vec![i as u8; 5000 + i]))
            .collect();
        let resources: Vec<Resource> = bodies
            .iter()
            .map(|(name, body)| Resource {
                name: leak(name.clone()),
                md5: leak(format!("{:x}", Md5::digest(body))),
            })
            .collect();
        let (url, requests) = mirror(bodies.clone());
        let dir = tempfile::tempdir().unwrap();
        let placed = fetch_resources(SourceKind::Svhn, &resources, &url, dir.path()).unwrap();
        for ((name, body), path) in bodies.iter().zip(&placed) {
            assert_eq!(path, &dir.path().join(name));
            assert_eq!(&std::fs::read(path).unwrap(), body);
        }
        assert_eq!(requests.load(Ordering::SeqCst), 2);
        fetch_resources(SourceKind::Svhn, &resources, &url, dir.path()).unwrap();
        assert_eq!(
            requests.load(Ordering::SeqCst),
            2,
            "files with the right MD5 are kept"
        );

        let mut damaged = bodies.clone();
        damaged[0].1[10] ^= 1;
        let (bad_url, _) = mirror(damaged);
        let empty = tempfile::tempdir().unwrap();
        let err =
            fetch_resources(SourceKind::Svhn, &resources, &bad_url, empty.path()).unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("expected {}", resources[0].md5)),
            "{err}"
        );
        assert_eq!(
            std::fs::read_dir(empty.path()).unwrap().count(),
            0,
            "nothing is kept"
        );
    }

    #[test]
    fn the_cifar_archive_is_checked_then_its_batches_extracted() {
        let names = [
            "data_batch_1.bin",
            "data_batch_2.bin",
            "data_batch_3.bin",
            "data_batch_4.bin",
            "data_batch_5.bin",
            "test_batch.bin",
            "batches.meta.txt",
        ];
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        for (i, name) in names.iter().enumerate() {
            let body = vec![i as u8; 3073];
            let mut header = tar::Header::new_gnu();
            header.set_size(body.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder
                .append_data(
                    &mut header,
                    format!("cifar-10-batches-bin/{name}"),
                    body.as_slice(),
                )
                .unwrap();
        }
        let archive = builder.into_inner().unwrap().finish().unwrap();
        let resources = [Resource {
            name: "cifar-10-binary.tar.gz",
            md5: leak(format!("{:x}", Md5::digest(&archive))),
        }];
        let (url, _) = mirror(vec![("cifar-10-binary.tar.gz".into(), archive)]);
        let dir = tempfile::tempdir().unwrap();
        let placed = fetch_resources(SourceKind::Cifar10, &resources, &url, dir.path()).unwrap();
        assert_eq!(placed.len(), 6);
        for (i, name) in names.iter().enumerate() {
            assert_eq!(
                std::fs::read(dir.path().join(name)).unwrap(),
                vec![i as u8; 3073],
                "{name}"
            );
        }
        assert!(
            !dir.path().join("cifar-10-binary.tar.gz").exists(),
            "the archive is removed"
        );
    }
}
