"""transformers' common model tests, pointed at GPT2ReproModel / GPT2ReproForCausalLM and at stock GPT-2 (control).

Not a test module of this project (its name does not start with test_, and it imports from transformers' own tests):
run.py copies it into the extracted transformers test suite as `test_gpt2_repro_common.py` and runs pytest there.

Three test classes, each with the base model and the LM head, each the same tiny shape:
- GPT2ReproUnpaddedTest: vocab_size == tokenizer_vocab_size (99): no padding ids, like a stock-vocabulary model;
- GPT2ReproPaddedTest: vocab_size 128 > tokenizer_vocab_size 99, like the default 50304 > 50257 (masked logits);
- StockGPT2ControlTest: transformers' GPT2Model / GPT2LMHeadModel, so a failure that is ours shows as a test the
  control passes.

Two ways to run, chosen by what the suite holds:
- a git checkout's tests/ (run.py --tests-from) has causal_lm_tester.py: each class is a transformers
  CausalLMModelTest (ModelTesterMixin, GenerationTesterMixin, PipelineTesterMixin and its own causal-LM tests, as
  transformers' decoder models are tested) with a CausalLMModelTester of the tiny shape;
- the PyPI source distribution has no causal_lm_tester.py: TinyGPT2Tester plays the tester's part (its attribute
  names and defaults) and the classes run ModelTesterMixin and GenerationTesterMixin (a stand-in there) directly.
Both add TrainingTesterMixin and the AdapterChecksMixin tests, this adapter's own, for behaviours whose transformers
tests live in files the source distribution lacks (generation/test_utils.py).
"""

import unittest
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, GPT2Model
from transformers.cache_utils import DynamicCache, StaticCache
from transformers.models.auto import modeling_auto

from modeling_gpt2_repro import GPT2ReproConfig, GPT2ReproForCausalLM, GPT2ReproModel

from .test_configuration_common import ConfigTester
from .test_modeling_common import GenerationTesterMixin, ModelTesterMixin, ids_tensor, torch_device
from .test_training_mixin import TrainingTesterMixin

# Set by run.py when the source distribution lacks generation/test_utils.py and a stand-in (an empty mixin) is used.
GENERATION_MIXIN_IS_STAND_IN = getattr(GenerationTesterMixin, "is_stand_in", False)

# transformers' causal-LM tester, where the suite has it (a git checkout); None with the source distribution. Imported
# only when the file is there, so that a checkout whose tester fails to import stops the run instead of falling back.
if Path(__file__).with_name("causal_lm_tester.py").is_file():
    from .causal_lm_tester import CausalLMModelTest, CausalLMModelTester
else:
    CausalLMModelTest = CausalLMModelTester = None

# Known to transformers as GPT2Model / GPT2LMHeadModel are: the Auto classes (as gpt2_repro.register_auto_classes
# does in the project's processes; some tests look the base model up in MODEL_MAPPING, and
# test_causal_lm_can_accept_training_kwargs builds the model with AutoModelForCausalLM.from_config and reloads it with
# from_pretrained, neither with trust_remote_code: a model of remote code loads that way only where its classes are
# registered in the process, the project's choice for its own processes, never something importing the model does),
# and the lists of class names by which the common tests pick labels and skip base models
# (get_values(MODEL_..._MAPPING_NAMES)).
AutoConfig.register(GPT2ReproConfig.model_type, GPT2ReproConfig, exist_ok=True)
AutoModel.register(GPT2ReproConfig, GPT2ReproModel, exist_ok=True)
AutoModelForCausalLM.register(GPT2ReproConfig, GPT2ReproForCausalLM, exist_ok=True)
modeling_auto.MODEL_MAPPING_NAMES.setdefault("gpt2_repro", "GPT2ReproModel")
modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault("gpt2_repro", "GPT2ReproForCausalLM")


# (config class, base model, LM head) of each kind
MODEL_CLASSES = {
    "ours": (GPT2ReproConfig, GPT2ReproModel, GPT2ReproForCausalLM),
    "stock": (GPT2Config, GPT2Model, GPT2LMHeadModel),
}
# The tiny shape, in CausalLMModelTester's names; ours needs n_embd divisible by n_head.
TINY_SHAPE = dict(
    batch_size=13,
    seq_length=7,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,  # small, so a packed row is longer than the position table
    initializer_range=0.02,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
DROPOUT = 0.1


class TinyGPT2Inputs:
    """The config, inputs and checks of both testers: the same tiny shape for ours and the control, ids drawn from
    the real (tokenizer) ids: a padded vocabulary's extra rows are never a token, so no input or label uses them."""

    def get_config(self):
        shape = dict(
            n_layer=self.num_hidden_layers,
            n_head=self.num_attention_heads,
            n_embd=self.hidden_size,
            n_positions=self.max_position_embeddings,
            vocab_size=self.vocab_size,
            initializer_range=self.initializer_range,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
        )
        if self.kind == "ours":
            return GPT2ReproConfig(**shape, tokenizer_vocab_size=self.tokenizer_vocab_size, dropout=self.dropout)
        p = self.dropout
        return GPT2Config(**shape, resid_pdrop=p, embd_pdrop=p, attn_pdrop=p)

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.tokenizer_vocab_size)  # (B, T) real ids
        # Lower-triangular: row i has i + 1 real positions, the rest right padding.
        input_mask = torch.tril(torch.ones_like(input_ids)).to(torch_device) if self.use_input_mask else None
        token_labels = ids_tensor([self.batch_size, self.seq_length], self.tokenizer_vocab_size)
        return self.get_config(), input_ids, input_mask, token_labels

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, input_mask, _ = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": input_mask}

    def create_and_check_model(self, config, input_ids, input_mask, token_labels):
        model = self.base_model_class(config).to(torch_device).eval()
        model(input_ids, attention_mask=input_mask)
        result = model(input_ids)
        self.parent.assertEqual(result.last_hidden_state.shape, (self.batch_size, self.seq_length, self.hidden_size))

    def create_and_check_lm_head(self, config, input_ids, input_mask, token_labels):
        model = self.causal_lm_class(config).to(torch_device).eval()
        result = model(input_ids, attention_mask=input_mask, labels=token_labels)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.seq_length, self.vocab_size))
        self.parent.assertTrue(torch.isfinite(result.loss))


class TinyGPT2Tester(TinyGPT2Inputs):
    """In the part of transformers' CausalLMModelTester (its attribute names), where the suite lacks it."""

    def __init__(self, parent, kind, vocab_size=99, tokenizer_vocab_size=99):
        self.parent, self.kind = parent, kind
        self.__dict__.update(TINY_SHAPE, is_training=True, use_input_mask=True, use_labels=True, dropout=DROPOUT)
        # vocab_size: the matrix rows; tokenizer_vocab_size: the real ids (ours only; below vocab_size = padded)
        self.vocab_size, self.tokenizer_vocab_size = vocab_size, tokenizer_vocab_size
        self.config_class, self.base_model_class, self.causal_lm_class = MODEL_CLASSES[kind]
        self.sequence_classification_class = None  # neither side is compared on heads ours does not have

    @property
    def all_model_classes(self):
        return (self.base_model_class, self.causal_lm_class)


if CausalLMModelTester is not None:

    class CausalTinyGPT2Tester(TinyGPT2Inputs, CausalLMModelTester):
        """transformers' CausalLMModelTester with the tiny shape and inputs above. A subclass per test class sets
        base_model_class, config_class, causal_lm_class, kind and vocab (CausalLMModelTest builds it from the
        test alone)."""

        kind = "ours"
        vocab: dict = {}

        def __init__(self, parent):
            super().__init__(parent, vocab_size=self.vocab["vocab_size"], **TINY_SHAPE)
            self.tokenizer_vocab_size, self.dropout = self.vocab["tokenizer_vocab_size"], DROPOUT
            # Neither side is compared on heads ours does not have: from the base class's name the tester infers
            # GPT2ForSequenceClassification, GPT2ForTokenClassification and GPT2ForQuestionAnswering for the control.
            self.sequence_classification_class = self.token_classification_class = None
            self.question_answering_class = None

    class _Suite(CausalLMModelTest):
        """transformers' CausalLMModelTest: ModelTesterMixin, GenerationTesterMixin, PipelineTesterMixin and the
        causal-LM tests (training kwargs, classification heads, RoPE scaling, flash attention)."""

        def setUp(self):
            super().setUp()
            # As transformers' own GPT-2 test: n_embd=36 (ours needs it divisible by the default 12 heads).
            self.config_tester = ConfigTester(self, config_class=self.model_tester.config_class, n_embd=36)

        @classmethod
        def _set_classes(cls):
            config_class, base, causal = MODEL_CLASSES[cls.kind]
            cls.all_model_classes = (base, causal)
            cls.pipeline_model_mapping = {"feature-extraction": base, "text-generation": causal}
            attrs = dict(base_model_class=base, config_class=config_class, causal_lm_class=causal)
            attrs.update(kind=cls.kind, vocab=cls.vocab)
            cls.model_tester_class = type(f"{cls.__name__}Tester", (CausalTinyGPT2Tester,), attrs)

else:

    class _Suite(ModelTesterMixin, GenerationTesterMixin):
        """ModelTesterMixin and GenerationTesterMixin (a stand-in when the suite lacks generation/test_utils.py)."""

        def setUp(self):
            self.model_tester = TinyGPT2Tester(self, self.kind, **self.vocab)
            self.config_tester = ConfigTester(self, config_class=self.model_tester.config_class, n_embd=36)

        @classmethod
        def _set_classes(cls):
            cls.all_model_classes = MODEL_CLASSES[cls.kind][1:]

        def test_config(self):
            self.config_tester.run_common_tests()

        def test_model(self):
            self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())


class AdapterChecksMixin:
    """This adapter's own checks (run on every class, the control included); see the module docstring."""

    def test_adapter_lm_head(self):
        self.model_tester.create_and_check_lm_head(*self.model_tester.prepare_config_and_inputs())

    def _check_packed_row_matches_padded_batch(self, attn_implementation):
        """Padding-free training (DataCollatorWithFlattening): sequences concatenated in one row, position_ids
        restarting at 0 for each, must give the logits the same sequences give in a right-padded batch."""
        config = self.model_tester.get_config()
        config._attn_implementation = attn_implementation
        torch.manual_seed(0)
        model = self.model_tester.causal_lm_class(config).to(torch_device).eval()
        lengths = [21, 17, 23, 9]  # 70 tokens in all: more than n_positions (64), each sequence fewer
        assert sum(lengths) > config.n_positions > max(lengths)
        seqs = [ids_tensor([n], self.model_tester.tokenizer_vocab_size) for n in lengths]
        T = max(lengths)
        padded = torch.zeros(len(seqs), T, dtype=torch.long, device=torch_device)  # (N, T)
        mask = torch.zeros_like(padded)
        for i, s in enumerate(seqs):
            padded[i, : len(s)], mask[i, : len(s)] = s, 1
        packed = torch.cat(seqs).unsqueeze(0)  # (1, sum(lengths))
        positions = torch.cat([torch.arange(n, device=torch_device) for n in lengths]).unsqueeze(0)
        with torch.no_grad():
            want = model(padded, attention_mask=mask).logits  # (N, T, V)
            # no cache: transformers builds the per-sequence (block-diagonal) mask from position_ids only then
            got = model(packed, position_ids=positions, use_cache=False).logits  # (1, sum(lengths), V)
        want = torch.cat([want[i, :n] for i, n in enumerate(lengths)])  # (sum(lengths), V), real positions only
        torch.testing.assert_close(got[0], want, atol=1e-4, rtol=1e-4)

    def test_adapter_eager_packed_row_matches_padded_batch(self):
        self._check_packed_row_matches_padded_batch("eager")

    def test_adapter_sdpa_packed_row_matches_padded_batch(self):
        self._check_packed_row_matches_padded_batch("sdpa")

    def test_adapter_compile_forward_fullgraph_with_static_cache(self):
        """`_can_compile_fullgraph = True`: one prefill and three decode steps through
        torch.compile(fullgraph=True) with a StaticCache, equal to the eager model with a DynamicCache.

        Dynamo captures the graph (and refuses data-dependent branches); backend="eager" skips code generation,
        which the capture does not need and which would cost minutes on CPU."""
        model_class = self.model_tester.causal_lm_class
        if not model_class._can_compile_fullgraph:
            self.skipTest(f"{model_class.__name__} does not declare _can_compile_fullgraph")
        config = self.model_tester.get_config()
        torch.manual_seed(0)
        model = model_class(config).to(torch_device).eval()
        torch._dynamo.reset()
        compiled = torch.compile(model.forward, fullgraph=True, backend="eager")
        prompt = ids_tensor([2, 8], self.model_tester.tokenizer_vocab_size)  # (B, T)
        static, dynamic = StaticCache(config=config, max_cache_len=16), DynamicCache(config=config)
        with torch.no_grad():
            got = compiled(input_ids=prompt, cache=static, use_cache=True).logits[:, -1]  # (B, V)
            want = model(input_ids=prompt, cache=dynamic, use_cache=True).logits[:, -1]
            for _ in range(3):
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
                nxt = want.argmax(-1, keepdim=True)  # (B, 1)
                got = compiled(input_ids=nxt, cache=static, use_cache=True).logits[:, -1]
                want = model(input_ids=nxt, cache=dynamic, use_cache=True).logits[:, -1]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


class _CommonTests(AdapterChecksMixin, _Suite, TrainingTesterMixin):
    kind = "ours"
    vocab: dict = {}
    model_tester = None  # set in setUp (TrainingTesterMixin declares it abstract)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._set_classes()


class GPT2ReproUnpaddedTest(_CommonTests, unittest.TestCase):
    kind = "ours"
    vocab = {"vocab_size": 99, "tokenizer_vocab_size": 99}


class GPT2ReproPaddedTest(_CommonTests, unittest.TestCase):
    kind = "ours"
    vocab = {"vocab_size": 128, "tokenizer_vocab_size": 99}  # 99 real ids padded to a multiple of 64


class StockGPT2ControlTest(_CommonTests, unittest.TestCase):
    kind = "stock"
    vocab = {"vocab_size": 99, "tokenizer_vocab_size": 99}
