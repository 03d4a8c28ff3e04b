//! Text to token ids, in Rust, with the exported `tokenizer.json`.

use std::path::Path;

use tokenizers::{PaddingParams, TruncationParams};

use super::ModelError;

/// One tokenized text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoding {
    /// Token ids, special tokens included; at most the model's `max_length`.
    pub ids: Vec<u32>,
    /// The word each token belongs to (`None` for special tokens), for word-level outputs.
    pub word_ids: Vec<Option<u32>>,
    /// Character (not byte) offsets of each token in the text.
    pub offsets: Vec<(usize, usize)>,
    /// The text was longer than the model's max length and lost its tail.
    pub truncated: bool,
}

/// The exported `tokenizer.json`, set to truncate at the model's max length and never to pad.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
}

impl TextTokenizer {
    /// Loads `path`, drops any padding it asks for and truncates at `max_length` tokens;
    /// `ModelError::Tokenizer` if either fails.
    pub fn from_file(path: &Path, max_length: usize) -> Result<Self, ModelError> {
        let tokenizer_error = |message: String| ModelError::Tokenizer { path: path.to_owned(), message };
        let mut inner = tokenizers::Tokenizer::from_file(path).map_err(|e| tokenizer_error(e.to_string()))?;
        // Whatever padding the file asks for, chunks are padded by the model runtime to their own
        // longest row; truncation is set to the model's limit so nothing too long reaches it.
        inner.with_padding(None::<PaddingParams>);
        inner
            .with_truncation(Some(TruncationParams { max_length, stride: 0, ..Default::default() }))
            .map_err(|e| tokenizer_error(e.to_string()))?;
        Ok(Self { inner })
    }

    /// Encodes many texts at once; `tokenizers` spreads the work over its thread pool.
    pub fn encode_batch<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Result<Vec<Encoding>, ModelError> {
        let inputs: Vec<&str> = texts.iter().map(AsRef::as_ref).collect();
        let encodings =
            self.inner.encode_batch_char_offsets(inputs, true).map_err(|e| ModelError::Tokenize(e.to_string()))?;
        Ok(encodings
            .into_iter()
            .map(|e| Encoding {
                truncated: !e.get_overflowing().is_empty(),
                ids: e.get_ids().to_vec(),
                word_ids: e.get_word_ids().to_vec(),
                offsets: e.get_offsets().to_vec(),
            })
            .collect())
    }
}
