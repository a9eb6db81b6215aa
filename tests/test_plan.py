"""`megatron-fusion plan`: parameter counts, the activation formulas, fit / no-fit / bad layouts."""

from __future__ import annotations

import re
import shlex

import pytest

from megatron_fusion import plan
from megatron_fusion.cli import plan_main
from megatron_fusion.config import ConfigError, ModelConfig, load_config

FUSE = "configs/recipes/fuse_14b.yaml"
FPO = "configs/recipes/fpo_14b.yaml"


def run_plan(capsys, *argv):
    rc = plan_main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def billions(out: str, label: str) -> float:
    m = re.search(rf"^\s+{re.escape(label)}\s+([\d.]+) B", out, re.M)
    assert m, f"no parameter line for {label!r} in:\n{out}"
    return float(m.group(1))


def test_fuse_14b_fits_on_4_nodes_and_counts_match_the_published_sizes(capsys):
    rc, out, err = run_plan(capsys, "--config", FUSE, "--nodes", "4", "--gpus-per-node", "8",
                            "--gpu-mem-gb", "80")
    assert rc == 0, out + err
    assert "result: fits" in out and "DOES NOT FIT" not in out
    assert billions(out, "pivot") == pytest.approx(14.66, rel=0.01)
    assert billions(out, "teacher qwen2.5-14b-instruct") == pytest.approx(14.77, rel=0.01)
    assert billions(out, "teacher qwen2.5-coder-14b-instruct") == pytest.approx(14.77, rel=0.01)
    assert billions(out, "teacher mistral-small-24b-instruct-2501") == pytest.approx(23.57, rel=0.01)
    assert "tokens per step: 262,144" in out
    totals = [float(x) for x in re.findall(r"^\s+total\s+([\d.]+)", out, re.M)]
    assert totals and max(totals) <= 80 * plan.USABLE_FRACTION
    # each piece of the model is printed: optimizer with/without distributed optimizer, recompute levels
    assert re.search(r"distributed over dp=4: [\d.]+ \| not distributed: [\d.]+", out)
    assert re.search(r"\[none [\d.]+ \| selective [\d.]+ \| full [\d.]+\]", out)
    assert "teacher top-K buffers" in out and "logits shard" in out


def test_exact_counts_of_the_three_families():
    cfg = load_config(FUSE)
    phi4 = plan.param_count(cfg.model)
    # Phi-4: 40 x (attention 5120*(5120+2*1280) + 5120*5120, SwiGLU 3*5120*17920, 2 norms) + 2 embeddings + norm
    layer = 5120 * (5120 + 2 * 1280) + 5120 * 5120 + 3 * 5120 * 17920 + 2 * 5120
    assert phi4.total == 40 * layer + 2 * 100352 * 5120 + 5120
    qwen, _, mistral = plan.teacher_models(cfg)
    q_layer = 5120 * (5120 + 2 * 1024) + (5120 + 2 * 1024) + 5120 * 5120 + 3 * 5120 * 13824 + 2 * 5120
    assert plan.param_count(qwen).total == 48 * q_layer + 2 * 152064 * 5120 + 5120
    m_layer = 5120 * (4096 + 2 * 1024) + 4096 * 5120 + 3 * 5120 * 32768 + 2 * 5120
    assert plan.param_count(mistral).total == 40 * m_layer + 2 * 131072 * 5120 + 5120
    tied = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=1000, tie_embeddings=True)
    assert plan.param_count(tied).output == 0


# Public config.json values (Hugging Face model cards) of the 2026 pivots, as HF config dicts
PUBLIC_CONFIGS = {
    "Llama-3.1-8B": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu",
        rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192}),
    "Qwen3-8B": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=4096,
        intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False,
        hidden_act="silu", rope_theta=1000000.0, attention_bias=False),
    "Qwen3-14B": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=5120,
        intermediate_size=17408, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=8,
        head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False,
        hidden_act="silu", rope_theta=1000000.0, attention_bias=False),
}


@pytest.mark.parametrize("name", sorted(PUBLIC_CONFIGS))
def test_counts_equal_the_hf_model_on_the_meta_device(name):
    """plan.param_count of the converted ModelConfig == the transformers model's numel (built on
    the meta device from the public config: nothing is allocated)."""
    import torch
    import transformers

    from megatron_fusion.convert import model_config_from_hf

    hf = dict(PUBLIC_CONFIGS[name])
    _, m = model_config_from_hf(hf)
    assert (m.rope_scaling, m.qk_layernorm) == (("llama3", False) if "Llama" in name else (None, True))
    cfg = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    assert plan.param_count(m).total == sum(p.numel() for p in model.parameters())


def test_plan_prints_the_llama31_8b_count(capsys):
    """`megatron-fusion plan` on a Llama-3.1-8B SFT layout (its shape as dotted overrides)."""
    from megatron_fusion.convert import model_config_from_hf

    _, m = model_config_from_hf(PUBLIC_CONFIGS["Llama-3.1-8B"])
    fields = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
              "vocab_size", "rotary_base", "rope_scaling", "norm_epsilon")
    model = [f"model.{f}={getattr(m, f)}" for f in fields] + ["model.seq_length=8192"]
    rc, out, err = run_plan(capsys, "--config", "configs/test/tiny_cpu.yaml", "--nodes", "1",
                            "--gpus-per-node", "8", "--gpu-mem-gb", "80", "parallel.tp=8", "parallel.pp=1",
                            "train.precision=bf16", "train.micro_batch=1", "train.global_batch=8",
                            "parallel.distributed_optimizer=true", *model)
    assert rc in (0, 1), out + err
    assert billions(out, "pivot") == pytest.approx(8_030_261_248 / 1e9, abs=0.005)


def _count_on_rank(rank, world_size):
    from megatron_fusion import model as model_lib
    from megatron_fusion.config import config_from_dict
    from megatron_fusion.parallel import init_student_groups

    groups = init_student_groups(tp=2, pp=2)
    results = []
    shapes = [  # GQA + qkv bias + head dim != hidden/heads, untied; and tied embeddings
        dict(num_layers=4, hidden_size=48, num_attention_heads=4, num_query_groups=2, kv_channels=16,
             ffn_hidden_size=40, vocab_size=250, add_qkv_bias=True, seq_length=16),
        dict(num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=4, ffn_hidden_size=64,
             vocab_size=300, tie_embeddings=True, seq_length=16),
        dict(num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2, kv_channels=12,
             ffn_hidden_size=64, vocab_size=300, qk_layernorm=True, seq_length=16),   # Qwen3-style
    ]
    for shape in shapes:
        cfg = config_from_dict({"model": shape, "parallel": {"tp": 2, "pp": 2}, "train": {"precision": "fp32"}})
        chunks = model_lib.build_model(cfg)
        results.append((groups.pp_rank, model_lib.count_parameters(chunks), shape))
    return results


@pytest.mark.dist
def test_stage_counts_equal_what_megatron_allocates_at_tp2_pp2():
    from megatron_fusion.local_ranks import run_on_ranks

    for rank_results in run_on_ranks(_count_on_rank, world_size=4):
        for pp_rank, counted, shape in rank_results:
            first, last = plan.stage_params(ModelConfig(**shape), tp=2, pp=2)
            assert counted == (first if pp_rank == 0 else last), (shape, pp_rank)


def test_activation_formula_reduces_to_korthikanti_for_a_gpt():
    s, b, h, a, t = 2048, 2, 1024, 16, 4
    gpt = ModelConfig(num_layers=24, hidden_size=h, num_attention_heads=a, swiglu=False,
                      ffn_hidden_size=4 * h, vocab_size=50304, seq_length=s)
    kw = dict(seq=s, micro=b, tp=t, flash=False, dropout=True)
    sbh = s * b * h
    # Table 2 of Korthikanti et al. (bytes per layer)
    assert plan.layer_activation_bytes(gpt, sp=False, recompute=None, **kw) == sbh * (10 + 24 // t) + 5 * a * s * s * b // t
    assert plan.layer_activation_bytes(gpt, sp=True, recompute=None, **kw) == (34 * sbh + 5 * a * s * s * b) // t
    assert plan.layer_activation_bytes(gpt, sp=False, recompute="selective", **kw) == sbh * (10 + 24 // t)
    assert plan.layer_activation_bytes(gpt, sp=True, recompute="selective", **kw) == 34 * sbh // t
    assert plan.layer_activation_bytes(gpt, sp=False, recompute="full", **kw) == 2 * sbh
    assert plan.layer_activation_bytes(gpt, sp=True, recompute="full", **kw) == 2 * sbh // t
    # flash attention keeps no s^2 term: only the fp32 log-sum-exp per head and token
    flash = plan.layer_activation_bytes(gpt, sp=True, recompute=None, **{**kw, "flash": True})
    assert flash == 34 * sbh // t + 4 * a * s * b // t


def test_layout_that_does_not_fit_suggests_one_that_does(capsys):
    rc, out, err = run_plan(capsys, "--config", FUSE, "--nodes", "4", "--gpus-per-node", "8",
                            "parallel.pp=1", "parallel.distributed_optimizer=false", "train.micro_batch=4")
    assert rc == 1, out + err
    assert "DOES NOT FIT" in out and "result: DOES NOT FIT" in out
    line = out.split("suggestion:", 1)[1].splitlines()[1].strip()
    args = shlex.split(line)
    assert args[:2] == ["megatron-fusion", "plan"]
    rc2, out2, err2 = run_plan(capsys, *args[2:])
    assert rc2 == 0, out2 + err2
    assert "result: fits" in out2


def test_teacher_that_does_not_fit_gets_a_larger_tp(capsys):
    # Mistral-Small-24B on one GPU at micro-batch 8: 8 x 4096 tokens of 131k-vocab logits
    rc, out, _ = run_plan(capsys, "--config", FUSE, "--nodes", "4", "--gpus-per-node", "8",
                          "fuse.teachers.2.tp=1", "train.micro_batch=8", "train.recompute=full")
    assert rc == 1
    assert re.search(r"teacher mistral-small-24b-instruct-2501 per GPU \(tp=1.*DOES NOT FIT", out)
    args = shlex.split(out.split("suggestion:", 1)[1].splitlines()[1])
    assert any(a.startswith("fuse.teachers.2.tp=") and a != "fuse.teachers.2.tp=1" for a in args)
    assert run_plan(capsys, *args[2:])[0] == 0


@pytest.mark.parametrize("override,field", [
    ("parallel.tp=4", "parallel.tp"),                       # Phi-4 has 10 KV heads
    ("parallel.pp=3", "parallel.pp"),                       # 40 layers / 3 stages
    ("train.global_batch=66", "train.global_batch"),        # not a multiple of micro*dp = 4
    ("fuse.teachers.2.ranks=7", "fuse.teachers.2.ranks"),   # not a multiple of the teacher's tp=4
    ("fuse.teachers.0.tp=3", "fuse.teachers.0.tp"),         # does not divide 40 heads
    ("fuse.teachers.1.model.vocab_size=0", "fuse.teachers.1.model.vocab_size"),
])
def test_bad_layout_is_one_line_naming_the_field(capsys, override, field):
    rc, out, err = run_plan(capsys, "--config", FUSE, "--nodes", "4", "--gpus-per-node", "8", override)
    assert rc == 2, out + err
    assert out == ""
    assert err.count("\n") == 1 and err.startswith(f"config error: {field}:"), err


def test_teacher_nodes_split_follows_forward_flops():
    cfg = load_config(FUSE)
    expected = {1: [2, 2, 4], 2: [4, 4, 8], 4: [8, 8, 16]}   # the table in configs/recipes/fuse_14b.yaml
    for teacher_nodes, ranks in expected.items():
        got = plan.split_teacher_ranks(cfg, teacher_nodes * 8)
        assert got == ranks
        assert all(r % tc.tp == 0 for r, tc in zip(got, cfg.fuse.teachers))
    with pytest.raises(ConfigError, match="--teacher-nodes"):
        plan.split_teacher_ranks(cfg, 3)                    # cannot hold tp 2 + 2 + 4
    with pytest.raises(ConfigError, match="--teacher-nodes"):
        plan.teacher_rank_overrides(cfg, 4, 4, 8)           # no node left for the student


def balance_ratios(out: str) -> dict[str, float]:
    line = next(x for x in out.splitlines() if x.startswith("teacher/student compute time"))
    return {name: float(r) for name, r in re.findall(r"(\S+) ([\d.]+)(?:,|$)", line.split(": ", 1)[1])}


@pytest.mark.parametrize("nodes,teacher_nodes", [(3, 2), (6, 4)])
def test_documented_fuse_layouts_fit_and_are_balanced(capsys, nodes, teacher_nodes):
    """The layouts in configs/recipes/fuse_14b.yaml (and launch/fuse_14b.sh's default split): every
    online teacher's compute per step is at most the student's."""
    rc, out, err = run_plan(capsys, "--config", FUSE, "--nodes", str(nodes), "--gpus-per-node", "8",
                            "--teacher-nodes", str(teacher_nodes))
    assert rc == 0, out + err
    assert f"online teachers: {teacher_nodes * 8} ranks = {teacher_nodes} nodes" in out
    ratios = balance_ratios(out)
    assert len(ratios) == 3 and max(ratios.values()) <= 1.0, ratios
    assert re.search(r"^balance: balanced ", out, re.M), out
    assert "(student waits)" not in out


@pytest.mark.parametrize("nodes", [2, 4, 8])
def test_documented_fpo_layouts_fit(capsys, nodes):
    rc, out, err = run_plan(capsys, "--config", FPO, "--nodes", str(nodes), "--gpus-per-node", "8")
    assert rc == 0, out + err
    assert "tokens per step: 524,288 (64 samples x 2 sequence(s) x 4096)" in out


def test_fpo_counts_chosen_and_rejected_in_activations():
    fpo = load_config(FPO)
    fuse_like = load_config(FPO, ["stage=sft"])
    lay = plan.Layout.of(fpo)
    a_fpo = plan.student_memory(fpo, lay, dp=8)[0].activations["selective"]
    a_sft = plan.student_memory(fuse_like, lay, dp=8)[0].activations["selective"]
    assert a_fpo == pytest.approx(2 * a_sft)


def test_launcher_layout_check_needs_no_sizes():
    """The launcher runs check_layout on every node: a config whose vocab comes from the tokenizer
    and whose online teachers give no `model` (configs/demo/tiny_online.yaml) passes it; plan
    itself still asks for the sizes it estimates with."""
    from megatron_fusion.config import ConfigError, load_config
    from megatron_fusion.plan import check_layout, make_plan

    cfg = load_config("configs/demo/tiny_online.yaml", [])
    assert check_layout(cfg, 1, 6) == 1                    # student TP2 + 2 teachers x 2 ranks
    with pytest.raises(ConfigError, match=r"fuse.teachers.0.tp: 2 must divide gpus per node \(5\)"):
        check_layout(cfg, 1, 5)
    with pytest.raises(ConfigError, match="model.vocab_size"):
        make_plan(cfg, 1, 6, 80)


def test_balance_says_how_many_replicas_hide_each_teacher(capsys):
    """Half of 4 nodes for the teachers: the student waits; plan names, per teacher, the replicas
    (ranks) that would hide it, and giving them those ranks makes the line say hidden."""
    rc, out, _ = run_plan(capsys, "--config", FUSE, "--nodes", "4", "--gpus-per-node", "8",
                          "--teacher-nodes", "2")
    assert rc == 0                                           # it fits; balance is a report
    assert re.search(r"^balance: NOT balanced: the student waits for qwen2.5-coder", out, re.M)
    assert balance_ratios(out)["qwen2.5-coder-14b-instruct"] == pytest.approx(4 / 3, abs=0.01)
    assert ("qwen2.5-coder-14b-instruct: 2 replica(s) x tp=2, ratio 1.33 (student waits); "
            "needs >= 4 replica(s) = 8 ranks at tp=2") in out
    assert "mistral-small-24b-instruct-2501: 2 replica(s) x tp=4, ratio 1.05 (student waits); " \
           "needs >= 4 replica(s) = 16 ranks at tp=4" in out
    # the old recipe (Qwen at tp=1): no replica count helps, one replica serves a whole DP rank
    rc, out, _ = run_plan(capsys, "--config", FUSE, "--nodes", "4", "--gpus-per-node", "8",
                          "fuse.teachers.0.tp=1")
    assert ("qwen2.5-coder-14b-instruct: 4 replica(s) x tp=1, ratio 1.33 (student waits); no "
            "replica count hides it at tp=1 (a replica serves whole DP ranks, dp=4); at tp=2: "
            ">= 4 replica(s) = 8 ranks") in out
    # follow the advice for the coder (8 ranks at tp=2) on 5 nodes: that teacher is hidden
    rc, out, _ = run_plan(capsys, "--config", FUSE, "--nodes", "5", "--gpus-per-node", "8",
                          "fuse.teachers.0.ranks=8", "fuse.teachers.2.ranks=12")
    assert "qwen2.5-coder-14b-instruct: 4 replica(s) x tp=2, ratio 0.67 (hidden)" in out


def test_teacher_balance_against_hand_computed_flops():
    """ratio = ceil(dp / replicas) * F_teacher * (tokens / dp) / tp over the student's
    3 * F_student * tokens / student_ranks, with F = 2 * matmul weights + 2 * L * s * a * d."""
    cfg = load_config(FUSE, ["fuse.teachers.0.ranks=6", "fuse.teachers.0.tp=2",
                             "fuse.teachers.1.ranks=2", "fuse.teachers.2.ranks=16"])
    p = plan.make_plan(cfg, 5, 8, 80)                        # 40 ranks - 24 teacher = 16 student
    assert (p.student_ranks, p.dp) == (16, 4)
    s, tokens = 4096, 64 * 4096

    def flops(m):
        pc = plan.param_count(m)
        matmul = (pc.per_layer - pc.layer_norms) * m.num_layers + pc.output
        return 2 * matmul + 2 * m.num_layers * s * m.num_attention_heads * m.head_dim

    qwen, _, mistral = plan.teacher_models(cfg)
    student = 3 * flops(cfg.model) * tokens / 16
    got = {b.name: b for b in plan.teacher_balance(p)}
    coder, qw, mi = (got[n] for n in ("qwen2.5-coder-14b-instruct", "qwen2.5-14b-instruct",
                                      "mistral-small-24b-instruct-2501"))
    # coder: 3 replicas of tp 2 for dp 4: the busiest serves 2 DP ranks
    assert coder.replicas == 3
    assert coder.ratio == pytest.approx(2 * flops(qwen) * tokens / 4 / 2 / student, rel=1e-12)
    assert coder.replicas_needed == 4 and not coder.hidden
    # qwen: 1 replica of tp 2 serves all 4 DP ranks
    assert qw.ratio == pytest.approx(4 * flops(qwen) * tokens / 4 / 2 / student, rel=1e-12)
    # mistral: 4 replicas of tp 4, one DP rank each
    assert mi.ratio == pytest.approx(flops(mistral) * tokens / 4 / 4 / student, rel=1e-12)
    assert mi.hidden and mi.replicas_needed == 4
    assert flops(qwen) == plan.forward_flops_per_token(qwen, s)


def test_replicas_beyond_dp_are_reported_idle(capsys):
    rc, out, _ = run_plan(capsys, "--config", FUSE, "--nodes", "4", "--gpus-per-node", "8",
                          "--teacher-nodes", "3")             # student: 8 ranks, dp 2
    assert re.search(r"mistral-small-24b-instruct-2501: (\d+) replica\(s\).*; (\d+) replica\(s\) "
                     r"idle \(more than dp=2\)", out), out
