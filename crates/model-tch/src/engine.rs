//! The torch side: a loaded module (a TorchScript trace or an AOTInductor package) and one padded
//! forward pass at a time. Only the model thread (see `batchbox_model`'s worker) touches it:
//! libtorch calls block.

use std::path::Path;

use tch::{CModule, Device, Kind, Tensor};

use batchbox_model::{Backend, Format, Manifest, ModelError, Output, Pad, Precision, Task};

use crate::aoti::Package;
use crate::{torch_error, variant};

/// What runs a pass: a module's format decides how.
enum Module {
    TorchScript(CModule),
    Aoti(Package),
}

impl Module {
    fn forward(&mut self, ids: Tensor, mask: Tensor, device: Device) -> Result<Tensor, ModelError> {
        match self {
            Self::TorchScript(module) => module.forward_ts(&[ids, mask]).map_err(torch_error),
            Self::Aoti(package) => {
                // Export specialises sizes 0 and 1 away (they become constants), so a package
                // takes at least 2 rows and 2 tokens: pad up with zeros, which the zero mask
                // hides (id 0 is as good as any), and cut the logits back to the real rows and tokens.
                let (rows, len) = (ids.size()[0], ids.size()[1]);
                let grow = [0, (2 - len).max(0), 0, (2 - rows).max(0)];
                let (ids, mask) = (
                    ids.f_constant_pad_nd(grow).map_err(torch_error)?,
                    mask.f_constant_pad_nd(grow).map_err(torch_error)?,
                );
                let logits = package.run(&[&ids, &mask]).map_err(|message| match device {
                    // The package hides the cause (aoti.rs): on a GPU it is most likely memory,
                    // and splitting a pass that failed for another reason only costs a retry.
                    Device::Cuda(_) => ModelError::OutOfMemory(format!(
                        "{message} (an AOTInductor package reports no cause; taken for CUDA out of memory)"
                    )),
                    _ => torch_error(tch::TchError::Torch(message)),
                })?;
                let logits = logits.narrow(0, 0, rows.min(logits.size()[0]));
                Ok(if logits.dim() == 3 { logits.narrow(1, 0, len.min(logits.size()[1])) } else { logits })
            }
        }
    }
}

pub(crate) struct Engine {
    module: Module,
    device: Device,
    pad_id: i64,
    task: Task,
    num_labels: usize,
}

impl Engine {
    pub fn load(
        dir: &Path,
        manifest: &Manifest,
        device: Device,
        precision: Precision,
        format: Format,
    ) -> Result<Self, ModelError> {
        let name = variant::name(precision, device, format);
        let entry = manifest.variants.get(&name).ok_or_else(|| ModelError::MissingVariant {
            dir: dir.to_owned(),
            variant: name.clone(),
            available: manifest.variants.keys().cloned().collect(),
        })?;
        let path = dir.join(&entry.file);
        let module = match entry.format {
            Format::TorchScript => {
                let mut module = CModule::load_on_device(&path, device)
                    .map_err(|e| ModelError::Load { path: path.clone(), message: e.to_string() })?;
                module.set_eval();
                Module::TorchScript(module)
            }
            Format::Aoti => Module::Aoti(Package::load(&path, device).map_err(|message| ModelError::Load {
                path: path.clone(),
                message: format!(
                    "{message}. An AOTInductor package runs only with the torch build and on the device it was \
                     compiled for; rebuild it here: `.venv/bin/python tools/export_model.py <checkpoint PATH | default | \
                     synthetic> --out {} --variants {}`",
                    dir.display(),
                    manifest.variants.keys().cloned().collect::<Vec<_>>().join(",")
                ),
            })?),
        };
        Ok(Self {
            module,
            device,
            pad_id: manifest.pad_token_id,
            task: manifest.task,
            num_labels: manifest.labels.len(),
        })
    }
}

/// A forward pass's inputs: token ids and attention mask, `[rows, padded_len]`.
pub(crate) struct Padded {
    ids: Tensor,
    mask: Tensor,
    /// Each row's own length.
    lens: Vec<usize>,
    padded_len: usize,
}

/// Builds a forward pass's input tensors; `Copy`, so the preparing thread has its own.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Padder {
    pad_id: i64,
    device: Device,
}

impl Pad for Padder {
    type Batch = Padded;

    fn pad(&self, rows: &[&[u32]]) -> Padded {
        let padded_len = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let mut ids = vec![self.pad_id; rows.len() * padded_len];
        let mut mask = vec![0i64; rows.len() * padded_len];
        for (r, row) in rows.iter().enumerate() {
            let start = r * padded_len;
            for (j, &id) in row.iter().enumerate() {
                ids[start + j] = i64::from(id);
                mask[start + j] = 1;
            }
        }
        let shape = [rows.len() as i64, padded_len as i64];
        let (mut ids, mut mask) = (Tensor::from_slice(&ids).view(shape), Tensor::from_slice(&mask).view(shape));
        if self.device.is_cuda() {
            // Page-locked memory lets the copy to the GPU run asynchronously.
            (ids, mask) = (ids.pin_memory(self.device), mask.pin_memory(self.device));
        }
        Padded { ids, mask, lens: rows.iter().map(|r| r.len()).collect(), padded_len }
    }
}

impl Backend for Engine {
    type Padder = Padder;

    fn padder(&self) -> Padder {
        Padder { pad_id: self.pad_id, device: self.device }
    }

    fn prepare_ahead(&self) -> bool {
        self.device.is_cuda()
    }

    fn forward(&mut self, batch: &Padded) -> Result<Vec<Output>, ModelError> {
        let _no_grad = tch::no_grad_guard();
        let (rows, padded_len) = (&batch.lens, batch.padded_len);
        let shape = [rows.len() as i64, padded_len as i64];
        let ids = batch.ids.to_device_(self.device, Kind::Int64, true, false);
        let mask = batch.mask.to_device_(self.device, Kind::Int64, true, false);
        let logits = self.module.forward(ids, mask, self.device)?;

        let expected: Vec<i64> = match self.task {
            Task::SequenceClassification => vec![shape[0], self.num_labels as i64],
            Task::TokenClassification => vec![shape[0], shape[1], self.num_labels as i64],
        };
        if logits.size() != expected {
            return Err(ModelError::OutputShape { expected, got: logits.size() });
        }
        let flat = Vec::<f32>::try_from(logits.to_kind(Kind::Float).to_device(Device::Cpu).flatten(0, -1))
            .map_err(torch_error)?;
        let labels = self.num_labels;
        Ok(match self.task {
            Task::SequenceClassification => {
                flat.chunks_exact(labels).map(|row| Output { data: row.to_vec(), shape: vec![labels] }).collect()
            }
            // Drop the padding rows: each sequence gets logits for its own tokens only.
            Task::TokenClassification => flat
                .chunks_exact(padded_len * labels)
                .zip(rows)
                .map(|(block, &len)| Output { data: block[..len * labels].to_vec(), shape: vec![len, labels] })
                .collect(),
        })
    }
}
