"""Vision-language models as yes/no relevance scorers: the INQUIRE-Rerank re-rankers of Table 3b.

INQUIRE asks an open vision-language model, for each (query, candidate image), whether the picture
shows the query, and scores the pair by the probability of answering yes against no at the first
generated token::

    score = P(Yes) / (P(Yes) + P(No))

This module follows the benchmark's own evaluation (``src/lmm_utils.py`` of the INQUIRE
repository) in everything that changes a ranking:

- the prompt of each model family, verbatim, including its quirks (no space after the question
  mark; ``"..."`` around the query for LLaVA-1.6-34B; lower-case ``yes``/``no`` for PaliGemma);
- which token is "Yes" and which is "No": the benchmark tokenises an answer word with the
  model's tokenizer (special tokens on) and takes the token at a fixed index; every entry of
  :data:`VLMS` records that word and index, and loading checks that the token decodes to it;
- the probabilities are those of the first generated token after the prompt and the image, read
  after a softmax at temperature 0.5 (the benchmark samples with temperature 0.5 and reads the
  renormalised scores of the first step). The ratio is sigmoid((logit_yes - logit_no) / T), so the
  temperature never changes a ranking, only the reported values.

One difference, on purpose: the benchmark's sampler also keeps only the 50 most likely tokens
before renormalising (the transformers default ``top_k=50`` of sampling), which sets the score to
exactly 0 or 1 when one answer is outside those 50 and to 0/0 when both are. Here the full softmax
is used, so such pairs keep their order instead of tying (or becoming NaN).

Models load through ``AutoProcessor`` and ``AutoModelForImageTextToText`` from a hub id or a
local directory (same code); on CUDA in half precision (bf16 where supported, else fp16), in
float32 on CPU. Candidates of one query are scored in batches; decoder-only models get left
padding so that the last position of every row is the next-token position.

VILA-1.5 (13B, 40B), also in Table 3b, needs the VILA code base (it is not a transformers model)
and the GPT-4 rows need OpenAI's API: neither is in :data:`VLMS`, and the tables show the paper's
reported numbers for them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

#: the benchmark's sampling temperature, at which it reads the two probabilities
INQUIRE_TEMPERATURE = 0.5
#: below this total probability of "Yes" and "No" the model is mostly answering something else
#: (the benchmark warns at the same value)
LOW_ANSWER_MASS = 0.9

# INQUIRE's question wordings (src/lmm_utils.py, get_lmm_prompt), kept character for character
_BLIP_PROMPT = ('Does this picture show {query}?Answer the question with either "Yes" or "No" '
                'and nothing else.\nAnswer: ')
_LLAVA15_PROMPT = ('USER: <image>\nDoes this picture show {query}?Answer the question with either '
                   '"Yes" or "No" and nothing else.\nASSISTANT:')
_LLAVA16_MISTRAL_PROMPT = ('[INST] <image>\nDoes this picture show {query}?Answer the question '
                           'with either "Yes" or "No" and nothing else. [/INST]')
_LLAVA16_34B_PROMPT = ('<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n'
                       '<image>\nDoes this picture show "{query}"?Answer the question with either '
                       '"Yes" or "No".<|im_end|><|im_start|>answer\n')
_PALIGEMMA_PROMPT = 'Q: Does this picture show {query}? Respond with yes or no.\nA:'


@dataclass(frozen=True)
class VLMSpec:
    """One open vision-language re-ranker of Table 3b and how INQUIRE queries it."""

    name: str          # method row, as spelt in paper-numbers.csv
    model: str         # Hugging Face hub id
    prompt: str        # question template; "{query}" is replaced by the query text
    yes: str           # word tokenised to find the "Yes" token
    no: str            # word tokenised to find the "No" token
    token_index: int   # position of the answer token in tokenizer(word).input_ids (0, 1 or -1)
    notes: str = ""    # provenance and what could not be verified offline

    def question(self, query: str) -> str:
        """The prompt for ``query`` (plain substitution: braces in a query are kept as they are)."""
        return self.prompt.replace("{query}", query)


_ENTRIES = (
    VLMSpec("blip2_flant5xxl", "Salesforce/blip2-flan-t5-xxl", _BLIP_PROMPT, "Yes", "No", 0,
            "T5 tokenizer: no BOS, so the answer word is token 0."),
    VLMSpec("instructblip_t5xxl", "Salesforce/instructblip-flan-t5-xxl", _BLIP_PROMPT, "Yes",
            "No", 0, "T5 tokenizer: no BOS, so the answer word is token 0."),
    VLMSpec("paligemma_3b_mix_448", "google/paligemma-3b-mix-448", _PALIGEMMA_PROMPT, "yes", "no",
            -1, "Gemma tokenizer adds BOS; the benchmark takes the last token."),
    VLMSpec("llava_1.5_13b", "llava-hf/llava-1.5-13b-hf", _LLAVA15_PROMPT, "Yes", "No", 1,
            "Llama tokenizer adds BOS; the answer word is token 1."),
    VLMSpec("llava_1.6_7b", "llava-hf/llava-v1.6-mistral-7b-hf", _LLAVA16_MISTRAL_PROMPT, "Yes",
            "No", 1, "LLaVA-NeXT on Mistral-7B (the benchmark's 'LLaVA-v1.6 7B')."),
    VLMSpec("llava_1.6_34b", "llava-hf/llava-v1.6-34b-hf", _LLAVA16_34B_PROMPT, " Yes", " No", 1,
            "LLaVA-NeXT on Yi-34B; the benchmark tokenises ' Yes' with a leading space."),
)

VLMS: dict[str, VLMSpec] = {spec.name: spec for spec in _ENTRIES}


def list_vlms() -> list[str]:
    """Names of the open VLM re-rankers that can be run, sorted."""
    return sorted(VLMS)


def get_vlm(name: str) -> VLMSpec:
    """The registry entry called ``name``; KeyError naming every known entry otherwise."""
    try:
        return VLMS[name]
    except KeyError:
        raise KeyError(f"unknown VLM {name!r}; known: {', '.join(list_vlms())} (VILA and GPT-4 "
                       "rows are not runnable here: see baselines.vlm.scorer)") from None


def answer_token(tokenizer, word: str, index: int) -> int:
    """The id of the answer token as the benchmark picks it: ``tokenizer(word).input_ids[index]``,
    checked to decode to ``word`` (up to case and surrounding spaces) so that a tokenizer which
    splits the word, or adds no BOS where one was expected, fails loudly instead of scoring the
    wrong token."""
    ids = tokenizer(word).input_ids
    token = ids[index]
    if tokenizer.decode([token]).strip().lower() != word.strip().lower():
        raise ValueError(f"token {index} of {word!r} is {tokenizer.decode([token])!r} (ids {ids}), "
                         f"not the answer word; this tokenizer does not match the entry")
    return int(token)


def yes_probability(logits: torch.Tensor, yes: int, no: int,
                    temperature: float = INQUIRE_TEMPERATURE) -> tuple[torch.Tensor, torch.Tensor]:
    """P(Yes) / (P(Yes) + P(No)) from next-token logits [B, V], and P(Yes) + P(No), both [B]
    float64, with probabilities softmax(logits / temperature). (The harness ranks float32
    scores, which tie at 1.0 once the answer logits differ by more than about 16 T; the
    benchmark's own float32 ratio of probabilities ties there too.)"""
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    ratio = torch.sigmoid(logp[:, yes] - logp[:, no])  # = p_yes / (p_yes + p_no), stably
    return ratio, logp[:, yes].exp() + logp[:, no].exp()


class YesNoScorer:
    """A frozen vision-language model that scores images against a text query (see module)."""

    def __init__(self, spec: VLMSpec, path: str | None = None, device: str | torch.device = "cpu",
                 temperature: float = INQUIRE_TEMPERATURE):
        from transformers import AutoModelForImageTextToText, AutoProcessor
        self.spec, self.temperature = spec, temperature
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            self.dtype = torch.float32
        source = path or spec.model
        self.processor = AutoProcessor.from_pretrained(source)
        self.model = AutoModelForImageTextToText.from_pretrained(source, dtype=self.dtype)
        self.model.to(self.device).eval().requires_grad_(False)
        tokenizer = self.processor.tokenizer
        if not self.model.config.is_encoder_decoder and not getattr(
                self.model.config.get_text_config(), "is_encoder_decoder", False):
            tokenizer.padding_side = "left"  # the last position of every row is the next token
        self.yes = answer_token(tokenizer, spec.yes, spec.token_index)
        self.no = answer_token(tokenizer, spec.no, spec.token_index)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
        logger.info("%s from %s on %s (%s): 'Yes' token %d, 'No' token %d", spec.name, source,
                    self.device, self.dtype, self.yes, self.no)

    def next_token_logits(self, images: Sequence, query: str) -> torch.Tensor:
        """Logits [B, V] of the first token the model would generate for each image."""
        prompt = self.spec.question(query)
        inputs = self.processor(images=list(images), text=[prompt] * len(images),
                                padding=True, return_tensors="pt")
        inputs = inputs.to(self.device)
        inputs = {k: (v.to(self.dtype) if torch.is_floating_point(v) else v)
                  for k, v in inputs.items()}
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=1, do_sample=False,
                                      output_logits=True, return_dict_in_generate=True,
                                      pad_token_id=self.pad)
        return out.logits[0].float()

    def score(self, images: Sequence, query: str) -> np.ndarray:
        """P(Yes) / (P(Yes) + P(No)) of each (RGB PIL) image for ``query``: float64 [B]."""
        if not len(images):
            return np.zeros(0)
        ratio, mass = yes_probability(self.next_token_logits(images, query), self.yes, self.no,
                                      self.temperature)
        low = int((mass < LOW_ANSWER_MASS).sum())
        if low:
            logger.warning("%s: for %d of %d images of query %r, 'Yes' and 'No' together have "
                           "probability below %.1f", self.spec.name, low, len(images), query,
                           LOW_ANSWER_MASS)
        return ratio.cpu().numpy()
