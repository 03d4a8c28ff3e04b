//! Text to token ids, in Rust, with the exported `tokenizer.json`.

use std::path::Path;

use tokenizers::{EncodeInput, PaddingParams, TruncationParams, TruncationStrategy};

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

/// How a sentence pair too long for the model is cut, as `tokenizers` and transformers name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairTruncation {
    /// A token at a time from the longer member (a cross-encoder's and TEI's rule).
    LongestFirst,
    /// From the first member only (zero-shot classification: the text, never the hypothesis).
    OnlyFirst,
    /// From the second member only (a query kept whole against a long passage).
    OnlySecond,
}

/// The exported `tokenizer.json`, set to truncate at the model's max length and never to pad.
pub struct TextTokenizer {
    /// Truncates `longest_first` (for one text, every strategy is the same).
    inner: tokenizers::Tokenizer,
    /// Copies truncating pairs by the other strategies, made only for a model that takes pairs.
    pairs: Option<PairTokenizers>,
}

/// The tokenizer again, truncating by `only_first` and by `only_second`.
struct PairTokenizers {
    only_first: tokenizers::Tokenizer,
    only_second: tokenizers::Tokenizer,
}

impl TextTokenizer {
    /// Loads `path`, drops any padding it asks for and truncates at `max_length` tokens, with the
    /// pair truncations too when the model takes `pairs`; `ModelError::Tokenizer` if any fails.
    pub fn from_file(path: &Path, max_length: usize, pairs: bool) -> Result<Self, ModelError> {
        let tokenizer_error = |message: String| ModelError::Tokenizer { path: path.to_owned(), message };
        let mut inner = tokenizers::Tokenizer::from_file(path).map_err(|e| tokenizer_error(e.to_string()))?;
        // Whatever padding the file asks for, chunks are padded by the model runtime to their own
        // longest row; truncation is set to the model's limit so nothing too long reaches it.
        inner.with_padding(None::<PaddingParams>);
        let truncating = |strategy| {
            let mut tokenizer = inner.clone();
            tokenizer
                .with_truncation(Some(TruncationParams { max_length, strategy, stride: 0, ..Default::default() }))
                .map_err(|e| tokenizer_error(e.to_string()))?;
            Ok::<_, ModelError>(tokenizer)
        };
        let pairs = match pairs {
            true => Some(PairTokenizers {
                only_first: truncating(TruncationStrategy::OnlyFirst)?,
                only_second: truncating(TruncationStrategy::OnlySecond)?,
            }),
            false => None,
        };
        Ok(Self { inner: truncating(TruncationStrategy::LongestFirst)?, pairs })
    }

    /// Encodes sentence pairs, joined by the tokenizer's pair template and cut by `truncation`.
    /// With `typed_vocab`, a token of type 1 (the second member, by the template) gets
    /// `typed_vocab` added to its id: see `Manifest::token_types`. `InvalidInput` for `only_first`
    /// or `only_second` from a tokenizer loaded without pairs.
    pub fn encode_pairs<S: AsRef<str> + Sync>(
        &self,
        pairs: &[(S, S)],
        truncation: PairTruncation,
        typed_vocab: Option<u32>,
    ) -> Result<Vec<Encoding>, ModelError> {
        let tokenizer = match (truncation, &self.pairs) {
            (PairTruncation::LongestFirst, _) => &self.inner,
            (PairTruncation::OnlyFirst, Some(pairs)) => &pairs.only_first,
            (PairTruncation::OnlySecond, Some(pairs)) => &pairs.only_second,
            (_, None) => return Err(ModelError::InvalidInput("this model takes no sentence pairs".into())),
        };
        let inputs: Vec<EncodeInput> =
            pairs.iter().map(|(a, b)| EncodeInput::Dual(a.as_ref().into(), b.as_ref().into())).collect();
        // `only_first`/`only_second` fail when the other member alone leaves no room: the
        // caller's input, not the host's fault.
        let encodings = tokenizer
            .encode_batch_char_offsets(inputs, true)
            .map_err(|e| ModelError::InvalidInput(format!("a sentence pair cannot be cut to fit: {e}")))?;
        Ok(encodings.into_iter().map(|e| encoding(e, typed_vocab)).collect())
    }

    /// Encodes many texts at once; `tokenizers` spreads the work over its thread pool.
    pub fn encode_batch<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Result<Vec<Encoding>, ModelError> {
        let inputs: Vec<&str> = texts.iter().map(AsRef::as_ref).collect();
        let encodings =
            self.inner.encode_batch_char_offsets(inputs, true).map_err(|e| ModelError::Tokenize(e.to_string()))?;
        Ok(encodings.into_iter().map(|e| encoding(e, None)).collect())
    }
}

/// One of `tokenizers`' encodings as the host passes it on; with `typed_vocab`, each token's type
/// goes into its id (`id + typed_vocab * type`).
fn encoding(e: tokenizers::Encoding, typed_vocab: Option<u32>) -> Encoding {
    Encoding {
        truncated: !e.get_overflowing().is_empty(),
        ids: match typed_vocab {
            Some(vocab) => e.get_ids().iter().zip(e.get_type_ids()).map(|(&id, &kind)| id + vocab * kind).collect(),
            None => e.get_ids().to_vec(),
        },
        word_ids: e.get_word_ids().to_vec(),
        offsets: e.get_offsets().to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A word-level tokenizer whose pair template is BERT's: `[CLS] a [SEP] b [SEP]`, types 0 then 1.
    fn tokenizer(max_length: usize) -> TextTokenizer {
        let json = r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"}, "decoder": null,
            "post_processor": {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                           {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": "[SEP]", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}},
                         {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
                "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [1], "tokens": ["[CLS]"]},
                                   "[SEP]": {"id": "[SEP]", "ids": [2], "tokens": ["[SEP]"]}}},
            "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "a": 3, "b": 4}, "unk_token": "[UNK]"}}"#;
        // One file per test (they run in parallel).
        let path =
            std::env::temp_dir().join(format!("batchbox-pair-tokenizer-{}-{max_length}.json", std::process::id()));
        std::fs::write(&path, json).unwrap();
        TextTokenizer::from_file(&path, max_length, true).unwrap()
    }

    fn ids(tokenizer: &TextTokenizer, pair: (&str, &str), truncation: PairTruncation, typed: Option<u32>) -> Vec<u32> {
        tokenizer.encode_pairs(&[pair], truncation, typed).unwrap().remove(0).ids
    }

    #[test]
    fn a_pair_takes_the_template_and_its_second_member_carries_type_one_in_the_ids() {
        let tokenizer = tokenizer(16);
        assert_eq!(ids(&tokenizer, ("a a", "b"), PairTruncation::LongestFirst, None), [1, 3, 3, 2, 4, 2]);
        // Type 1 (the second member and its [SEP]) is `id + vocab`.
        assert_eq!(ids(&tokenizer, ("a a", "b"), PairTruncation::LongestFirst, Some(10)), [1, 3, 3, 2, 14, 12]);
    }

    #[test]
    fn each_truncation_cuts_the_member_it_names_and_one_that_cannot_fit_is_invalid_input() {
        let tokenizer = tokenizer(7);
        let (long, short) = ("a a a a a a", "b b");
        // 3 special tokens leave 4: longest_first cuts the longer member down to the other's size.
        assert_eq!(ids(&tokenizer, (long, short), PairTruncation::LongestFirst, None), [1, 3, 3, 2, 4, 4, 2]);
        assert_eq!(ids(&tokenizer, (long, short), PairTruncation::OnlyFirst, None), [1, 3, 3, 2, 4, 4, 2]);
        assert_eq!(ids(&tokenizer, (short, long), PairTruncation::OnlySecond, None), [1, 4, 4, 2, 3, 3, 2]);
        let refused = tokenizer.encode_pairs(&[(long, short)], PairTruncation::OnlySecond, None);
        assert!(matches!(refused, Err(ModelError::InvalidInput(_))), "{refused:?}");
        assert!(tokenizer.encode_pairs(&[(long, short)], PairTruncation::OnlyFirst, None).unwrap()[0].truncated);
    }
}
