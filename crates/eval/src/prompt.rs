//! Turning test conversations into token ids exactly as training does.

use anyhow::{anyhow, bail, Context, Result};
use dsel_ingest::{Example, Message};
use dsel_tokenize::{ChatFormat, Formatter, TokenizeConfig};
use tokenizers::Tokenizer;

/// Stand-in assistant content used to locate where the assistant turn starts.
const SENTINEL: &str = "\u{2063}dsel-eval-sentinel\u{2063}";

/// Encodes prompts and completions with a model's tokenizer and chat format.
///
/// Every conversation is tokenized by [`dsel_tokenize::encode`] — the same
/// routine the `tokenize` stage uses for training (each chat-format segment
/// tokenized on its own, no special tokens added, optional BOS) — so the
/// prompt tokens seen at evaluation are the ones seen in training.
pub struct PromptEncoder {
    tokenizer: Tokenizer,
    formatter: Formatter,
    bos_id: Option<u32>,
    stop_ids: Vec<u32>,
}

impl PromptEncoder {
    /// An encoder for `format` (the model's template, or tulu) with `bos_id`
    /// prepended to every sequence (tulu: the model's BOS; templates: `None`,
    /// the template writes it). `stop_ids` end a generation (end of sequence,
    /// end of turn).
    pub fn new(
        tokenizer: Tokenizer,
        format: ChatFormat,
        bos_id: Option<u32>,
        stop_ids: Vec<u32>,
    ) -> Result<Self> {
        let formatter = Formatter::new(format).context("compiling the chat format")?;
        Ok(Self {
            tokenizer,
            formatter,
            bos_id,
            stop_ids,
        })
    }

    /// Token ids that end a generation.
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Token ids of `text` on its own (no special tokens added).
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode_fast(text, false)
            .map_err(|e| anyhow!("tokenizing {text:?}: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| anyhow!("decoding {} tokens: {e}", ids.len()))
    }

    /// Token ids and label mask of `messages` followed by an assistant turn
    /// holding `completion`, exactly as the `tokenize` stage would encode it
    /// (labels: the assistant turns' content and end-of-turn text).
    /// Sequences longer than `max_len` are cut from the right; an error is
    /// returned when no label survives.
    pub fn completion(
        &self,
        messages: &[Message],
        completion: &str,
        max_len: usize,
    ) -> Result<(Vec<u32>, Vec<u8>)> {
        let mut msgs = messages.to_vec();
        msgs.push(Message {
            role: "assistant".into(),
            content: completion.to_string(),
        });
        let ex = Example {
            messages: msgs,
            ..Default::default()
        };
        let cfg = TokenizeConfig {
            max_len,
            bos_id: self.bos_id,
            truncation: Default::default(),
        };
        let enc = dsel_tokenize::encode(&self.tokenizer, &self.formatter, &ex, &cfg)
            .map_err(|s| anyhow!("encoding the completion: {} ({s:?})", s.reason()))?;
        Ok((enc.ids, enc.labels))
    }

    /// Token ids of the prompt of `messages` (which must not end with an
    /// assistant turn): the formatted conversation up to where the model's
    /// assistant turn starts (the generation prompt, e.g. ChatML's
    /// `<|im_start|>assistant\n` or tulu's `<|assistant|>\n`), followed by the
    /// tokens of `assistant_prefix` (tokenized on its own; nothing when empty).
    pub fn prompt(&self, messages: &[Message], assistant_prefix: &str) -> Result<Vec<u32>> {
        if messages.last().is_some_and(|m| m.role == "assistant") {
            bail!("prompt: the conversation already ends with an assistant turn");
        }
        if messages.is_empty() {
            bail!("prompt: empty conversation");
        }
        let (ids, labels) = self.completion(messages, SENTINEL, usize::MAX)?;
        // The last run of label tokens is the sentinel turn; the prompt ends
        // where it starts.
        let end = labels
            .iter()
            .rposition(|&l| l == 1)
            .ok_or_else(|| anyhow!("prompt: the chat format produced no assistant span"))?;
        let start = labels[..=end]
            .iter()
            .rposition(|&l| l == 0)
            .map_or(0, |p| p + 1);
        let mut out = ids[..start].to_vec();
        let sentinel_text = self.decode(&ids[start..=end])?;
        if !sentinel_text.contains("dsel-eval-sentinel") {
            bail!("prompt: cannot locate the assistant turn in the chat format's output");
        }
        if !assistant_prefix.is_empty() {
            out.extend(self.encode_text(assistant_prefix)?);
        }
        if out.is_empty() {
            bail!("prompt: empty prompt");
        }
        Ok(out)
    }
}
