"""Tests for worker/sampler.py: processing order, penalties, truncation, seeds, logprobs.

Expected values are computed here independently (by hand, or in float64 from the definitions),
never by calling the sampler's own helpers.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from folio.protos.messages import SamplingParams
from folio.worker.sampler import Sampler, _argmax

V = 16
EOS = 15


def make_sampler(vocab=V, eos=(EOS,), seed=0) -> Sampler:
    return Sampler(vocab, eos, seed=seed)


def run_steps(sampler, rid, logits_row, steps=1):
    """Tokens of one request over `steps` steps with the same logits each step."""
    return [sampler.sample(logits_row[None, :], [rid])[0][0] for _ in range(steps)]


def row(*values, vocab=V, fill=-10.0):
    """A [vocab] logits row starting with `values`, the rest `fill`."""
    out = torch.full((vocab,), fill)
    out[: len(values)] = torch.tensor(values)
    return out


def test_greedy_is_argmax():
    sampler = make_sampler()
    logits = torch.randn(8, V, generator=torch.Generator().manual_seed(0))
    ids = [f"r{i}" for i in range(8)]
    for i, rid in enumerate(ids):
        sampler.add_request(rid, SamplingParams(temperature=0.0, logprobs=2 if i % 2 else None), [1])
    tokens = [t for t, _ in sampler.sample(logits, ids)]
    assert tokens == logits.argmax(-1).tolist()


def test_logit_bias_forces_and_bans():
    sampler = make_sampler()
    logits = row(5.0, 4.0, 3.0, -5.0)
    sampler.add_request("force_greedy", SamplingParams(temperature=0.0, logit_bias={3: 100.0}), [1])
    sampler.add_request("force_random", SamplingParams(temperature=1.0, seed=1, logit_bias={3: 100.0}), [1])
    sampler.add_request("ban", SamplingParams(temperature=0.0, logit_bias={0: -100.0}), [1])
    out = sampler.sample(torch.stack([logits] * 3), ["force_greedy", "force_random", "ban"])
    assert [t for t, _ in out] == [3, 3, 1]
    with pytest.raises(ValueError):
        sampler.add_request("bad", SamplingParams(logit_bias={V: 1.0}), [1])


def test_min_tokens_bans_eos_and_stop_ids_then_allows_them():
    sampler = make_sampler()
    logits = row(0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0, fill=-10.0)
    logits[EOS] = 3.0  # EOS > stop id 6 > token 5
    sampler.add_request("r", SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[6]), [1])
    assert run_steps(sampler, "r", logits, steps=3) == [5, 5, EOS]
    # With ignore_eos, EOS is an ordinary token that min_tokens leaves alone.
    sampler.add_request("i", SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[6], ignore_eos=True), [1])
    assert run_steps(sampler, "i", logits) == [EOS]
    # A rebuilt request counts its earlier outputs towards min_tokens.
    sampler.add_request(
        "rebuilt", SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[6]), [1], output_token_ids=[5]
    )
    assert run_steps(sampler, "rebuilt", logits, steps=2) == [5, EOS]


# Each case: logits, prompt, outputs, params, expected greedy token. The two tokens that matter
# sit on either side of a threshold, so the wrong formula picks the other one.
PENALTY_CASES = {
    # 3.0 / 1.5 = 2.0 < 2.5, but 3.0 / 1.1 = 2.73 > 2.5
    "repetition_positive_strong": (row(3.0, 2.5), [0], [], dict(repetition_penalty=1.5), 1),
    "repetition_positive_weak": (row(3.0, 2.5), [0], [], dict(repetition_penalty=1.1), 0),
    # negative logits are multiplied: -1.0 * 1.5 = -1.5 < -1.2; -1.0 * 1.1 = -1.1 > -1.2
    "repetition_negative_strong": (row(-1.0, -1.2), [0], [], dict(repetition_penalty=1.5), 1),
    "repetition_negative_weak": (row(-1.0, -1.2), [0], [], dict(repetition_penalty=1.1), 0),
    "repetition_counts_outputs": (row(3.0, 2.5), [9], [0], dict(repetition_penalty=1.5), 1),
    "repetition_below_one_boosts": (row(2.5, 3.0), [0], [], dict(repetition_penalty=0.8), 0),
    # two outputs of token 0: 5.0 - 2 * 0.6 = 3.8 < 4.0; 5.0 - 2 * 0.4 = 4.2 > 4.0
    "frequency_strong": (row(5.0, 4.0), [9], [0, 0], dict(frequency_penalty=0.6), 1),
    "frequency_weak": (row(5.0, 4.0), [9], [0, 0], dict(frequency_penalty=0.4), 0),
    "frequency_ignores_prompt": (row(5.0, 4.0), [0, 0], [], dict(frequency_penalty=0.6), 0),
    "frequency_negative_boosts": (row(4.0, 5.0), [9], [0, 0], dict(frequency_penalty=-0.6), 0),
    # presence is once, not per occurrence: 5.0 - 0.4 = 4.6 > 4.5 (per count it would be 3.8)
    "presence_weak": (row(5.0, 4.5), [9], [0, 0, 0], dict(presence_penalty=0.4), 0),
    "presence_strong": (row(5.0, 4.5), [9], [0, 0, 0], dict(presence_penalty=0.6), 1),
    "presence_ignores_prompt": (row(5.0, 4.5), [0], [], dict(presence_penalty=0.6), 0),
    # repetition first, then frequency: 4.0 / 2 - 0.3 = 1.7 < 1.8; the other order gives 1.85
    "repetition_then_frequency": (row(4.0, 1.8), [9], [0], dict(repetition_penalty=2.0, frequency_penalty=0.3), 1),
    # bias before repetition: (1.0 + 3.0) / 2 = 2.0 < 2.2; the other order gives 3.5
    "bias_then_repetition": (row(1.0, 2.2), [0], [], dict(logit_bias={0: 3.0}, repetition_penalty=2.0), 1),
}


@pytest.mark.parametrize("case", PENALTY_CASES)
def test_penalty_matches_hand_computed(case):
    logits, prompt, outputs, kwargs, expected = PENALTY_CASES[case]
    sampler = make_sampler()
    sampler.add_request("r", SamplingParams(temperature=0.0, **kwargs), prompt, outputs)
    assert run_steps(sampler, "r", logits) == [expected]


def test_penalty_state_follows_sampled_tokens_and_slots_are_reset():
    sampler = make_sampler()
    logits = row(0.3, 0.2, 0.1, 0.0)
    params = SamplingParams(temperature=0.0, frequency_penalty=1.0)
    # Each pick costs that token 1.0, so the argmax walks down the list and wraps around.
    sampler.add_request("a", params, [9])
    assert run_steps(sampler, "a", logits, steps=5) == [0, 1, 2, 3, 0]
    # Slots are reused: a new request must not inherit a's counts.
    sampler.remove_request("a")
    sampler.add_request("b", params, [9])
    assert run_steps(sampler, "b", logits, steps=2) == [0, 1]
    sampler.remove_request("missing")  # unknown ids are ignored


def test_penalty_buffers_grow_with_many_requests():
    sampler = make_sampler()
    ids = [f"r{i}" for i in range(20)]  # more than the initial slot count
    for i, rid in enumerate(ids):
        sampler.add_request(rid, SamplingParams(temperature=0.0, presence_penalty=2.0), [9], [i % 4])
    logits = torch.stack([row(0.3, 0.2, 0.1, 0.0)] * len(ids))
    tokens = [t for t, _ in sampler.sample(logits, ids)]
    assert tokens == [1 if i % 4 == 0 else 0 for i in range(len(ids))]


# ---------------------------------------------------------------- truncation properties


def softmax64(logits, temperature=1.0):
    x = logits.double() / temperature
    return torch.softmax(x, -1)


def sample_many(logits_row, params_kwargs, draws=32, base_seed=0):
    """`draws` samples of one logits row, as a batch of seeded requests."""
    sampler = make_sampler(vocab=logits_row.shape[0], eos=())
    ids = [f"r{i}" for i in range(draws)]
    for i, rid in enumerate(ids):
        sampler.add_request(rid, SamplingParams(seed=base_seed + i, **params_kwargs), [0])
    return [t for t, _ in sampler.sample(logits_row.expand(draws, -1).contiguous(), ids)]


logits_rows = st.lists(st.floats(-4.0, 4.0, width=32), min_size=2, max_size=12).map(torch.tensor)
temperatures = st.floats(0.3, 2.0)
PROPERTY_SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


@PROPERTY_SETTINGS
@given(logits=logits_rows, temperature=temperatures, data=st.data())
def test_top_k_never_emits_excluded_token(logits, temperature, data):
    k = data.draw(st.integers(1, logits.shape[0]))
    for t in sample_many(logits, dict(temperature=temperature, top_k=k)):
        # with ties, any tied token may be among the k
        assert (logits > logits[t]).sum() < k


@PROPERTY_SETTINGS
@given(logits=logits_rows, temperature=temperatures, top_p=st.floats(0.01, 1.0))
def test_top_p_never_emits_excluded_token(logits, temperature, top_p):
    probs = softmax64(logits, temperature)
    for t in sample_many(logits, dict(temperature=temperature, top_p=top_p)):
        mass_before = probs[probs > probs[t]].sum()
        assert mass_before < top_p + 1e-5


@PROPERTY_SETTINGS
@given(logits=logits_rows, temperature=temperatures, min_p=st.floats(0.0, 1.0))
def test_min_p_never_emits_excluded_token(logits, temperature, min_p):
    probs = softmax64(logits, temperature)
    for t in sample_many(logits, dict(temperature=temperature, min_p=min_p)):
        assert probs[t] >= min_p * probs.max() - 1e-6


# ---------------------------------------------------------------- distribution


def reference_probs(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """float64 target distribution straight from the definitions (no ties in `logits`)."""
    probs = softmax64(logits, temperature)
    order = probs.argsort(descending=True)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if top_k:
        keep[order[top_k:]] = False
    probs = torch.where(keep, probs, 0.0) / torch.where(keep, probs, 0.0).sum()
    before = 0.0
    for i in order.tolist():
        if before >= top_p:
            keep[i] = False
        before += probs[i].item()
    keep &= probs >= min_p * probs.max()
    probs = torch.where(keep, probs, 0.0)
    return probs / probs.sum()


@pytest.mark.parametrize(
    "config",
    [
        dict(temperature=0.7),
        dict(temperature=1.3, top_k=3),
        dict(temperature=1.0, top_p=0.7),
        dict(temperature=0.9, min_p=0.2),
    ],
)
def test_sampling_distribution_matches_reference(config):
    logits = torch.tensor([1.0, 0.6, 0.2, -0.3, -0.8, -1.5])
    draws = 3000
    sampler = make_sampler(vocab=6, eos=(), seed=1)
    ids = [f"r{i}" for i in range(draws)]
    for i, rid in enumerate(ids):  # alternate seeded rows and rows on the shared generator
        sampler.add_request(rid, SamplingParams(seed=i if i % 2 else None, **config), [0])
    tokens = torch.tensor([t for t, _ in sampler.sample(logits.expand(draws, -1).contiguous(), ids)])
    observed = torch.bincount(tokens, minlength=6).double()
    expected = reference_probs(logits, **config) * draws
    assert observed[expected == 0].sum() == 0
    nonzero = expected > 0
    chi2 = (((observed - expected)[nonzero] ** 2) / expected[nonzero]).sum().item()
    assert chi2 < 30.0, (observed.tolist(), expected.tolist())  # df <= 5: p < 1e-4


# ---------------------------------------------------------------- seeds

SEEDED = SamplingParams(temperature=1.0, top_k=24, seed=123, frequency_penalty=0.5)
STEPS = 6


def seeded_logits():
    g = torch.Generator().manual_seed(42)
    return [torch.randn(32, generator=g) for _ in range(STEPS)]


def run_seeded(companions: bool, rebuild_at=None):
    """Tokens of request "s" (params SEEDED) over STEPS steps, optionally batched with other
    seeded / unseeded / greedy requests in a different row order each step, and optionally
    removed and rebuilt from its outputs before step `rebuild_at`."""
    sampler = Sampler(32, [31])
    sampler.add_request("s", SEEDED, [1, 2, 3])
    others = {
        "other_seeded": SamplingParams(temperature=1.0, seed=7),
        "unseeded": SamplingParams(temperature=0.8, top_p=0.9),
        "greedy": SamplingParams(temperature=0.0, presence_penalty=1.0),
    }
    for rid, params in others.items():
        sampler.add_request(rid, params, [4, 5])
    noise = torch.Generator().manual_seed(0)
    tokens = []
    for step, logits in enumerate(seeded_logits()):
        if step == rebuild_at:
            sampler.remove_request("s")
            sampler.add_request("s", SEEDED, [1, 2, 3], tokens)
        ids = ["s"]
        if companions:
            ids = list(others)
            ids.insert(step % (len(ids) + 1), "s")
        batch = torch.randn(len(ids), 32, generator=noise)
        batch[ids.index("s")] = logits
        tokens.append(sampler.sample(batch, ids)[ids.index("s")][0])
    return tokens


def test_seeded_request_is_independent_of_batch_and_rebuild():
    alone = run_seeded(companions=False)
    assert run_seeded(companions=True) == alone
    assert run_seeded(companions=True, rebuild_at=3) == alone
    assert run_seeded(companions=False, rebuild_at=1) == alone


def test_seeded_noise_varies_across_seeds_and_steps():
    logits = torch.zeros(64)
    first = [sample_many(logits, dict(temperature=1.0), draws=1, base_seed=s)[0] for s in range(8)]
    assert len(set(first)) > 1
    sampler = make_sampler(vocab=64, eos=())
    sampler.add_request("r", SamplingParams(temperature=1.0, seed=5), [0])
    assert len(set(run_steps(sampler, "r", logits, steps=8))) > 1


# ---------------------------------------------------------------- logprobs


def check_logprob(entry, logits_row, token, num_top):
    expected = torch.log_softmax(logits_row.double(), -1)
    assert entry.token_id == token
    assert entry.logprob == pytest.approx(expected[token].item(), abs=1e-5)
    assert entry.rank == 1 + int((expected > expected[token] + 1e-9).sum())
    top = expected.topk(num_top)
    assert [t for t, _ in entry.top] == top.indices.tolist()
    assert [lp for _, lp in entry.top] == pytest.approx(top.values.tolist(), abs=1e-5)


def test_sampled_logprobs_come_from_raw_logits():
    sampler = make_sampler()
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(3))
    requests = {
        "greedy": (SamplingParams(temperature=0.0, logprobs=3), 3),
        # forced to the least likely token: its raw logprob and rank are reported, not ~0 and 1
        "forced": (
            SamplingParams(
                temperature=0.5, seed=1, logprobs=0, repetition_penalty=1.5, logit_bias={int(logits[1].argmin()): 100.0}
            ),
            0,
        ),
        "sampled": (SamplingParams(temperature=1.0, seed=2, top_k=4, logprobs=5), 5),
        "none": (SamplingParams(temperature=0.0), None),
        "twenty": (SamplingParams(temperature=0.0, logprobs=20), V),
    }
    for rid, (params, _) in requests.items():
        sampler.add_request(rid, params, [0, 1])
    out = sampler.sample(logits, list(requests))
    for i, (_, num_top) in enumerate(requests.values()):
        token, entry = out[i]
        if num_top is None:
            assert entry is None
        else:
            check_logprob(entry, logits[i], token, num_top)
    assert out[1][1].rank == V and out[1][1].top == []


def test_prompt_logprobs():
    sampler = make_sampler()
    g = torch.Generator().manual_seed(4)
    rows = 600  # more than one internal chunk
    logits = torch.randn(rows, V, generator=g)
    targets = torch.randint(0, V, (rows,), generator=g)
    for num_top in (0, 4):
        entries = sampler.prompt_logprobs(logits, targets, num_top)
        assert len(entries) == rows
        for i in (0, 1, 511, 512, rows - 1):
            check_logprob(entries[i], logits[i], targets[i].item(), num_top)
    assert all(math.isfinite(e.logprob) for e in entries)


# ---------------------------------------------------------------- draft-model speculation

# Six tokens; the draft favours what the target does not, so a wrong residual shows.
SPEC_P = [[0.50, 0.30, 0.10, 0.05, 0.03, 0.02], [0.05, 0.10, 0.40, 0.25, 0.15, 0.05]]
SPEC_Q = [[0.05, 0.05, 0.10, 0.30, 0.30, 0.20], [0.30, 0.30, 0.05, 0.05, 0.20, 0.10]]
CHI2_DF5_P001 = 20.515  # chi-square critical value, 5 degrees of freedom, p = 0.001


def _chi2(counts: torch.Tensor, probs: list[float]) -> float:
    expected = torch.tensor(probs, dtype=torch.float64) * counts.sum()
    return float(((counts.double() - expected) ** 2 / expected).sum())


def test_rejection_sampling_against_a_draft_keeps_the_target_distribution():
    """Two drafts per request drawn from q, verified against p by verify(): the first
    output token is distributed as p[0], and the second (present when the first draft was
    kept) as p[1]. Resampling a rejected position from p instead of the residual
    max(0, p - q), or keeping a draft with probability p instead of min(1, p/q), fails."""
    n = 6000
    sampler = Sampler(vocab_size=6, eos_token_ids=[], seed=3)
    ids = [f"r{i}" for i in range(n)]
    for rid in ids:
        sampler.add_request(rid, SamplingParams(temperature=1.0, max_tokens=8), [1])
    p, q = torch.tensor(SPEC_P), torch.tensor(SPEC_Q)
    # Per request: a row per draft (temperature 1: the target samples exactly p) and one after.
    logits = torch.cat([p.log(), torch.zeros(1, 6)]).repeat(n, 1)
    gen = torch.Generator().manual_seed(5)
    drafts = torch.multinomial(q, n, replacement=True, generator=gen).T.tolist()  # [n, 2], row j ~ q[j]
    out = sampler.verify(logits, ids, drafts, [q] * n)
    first = torch.bincount(torch.tensor([o[0][0] for o in out]), minlength=6)
    second = torch.bincount(torch.tensor([o[1][0] for o in out if len(o) > 1]), minlength=6)
    assert second.sum() > 1000, "too few first drafts kept to test the second position"
    assert _chi2(first, SPEC_P[0]) < CHI2_DF5_P001
    assert _chi2(second, SPEC_P[1]) < CHI2_DF5_P001
    # The draft is kept exactly with probability sum(min(p, q)).
    kept = sum(len(o) > 1 for o in out) / n
    assert kept == pytest.approx(float(torch.minimum(p[0], q[0]).sum()), abs=0.02)


def test_seeded_drafts_share_the_targets_noise():
    """A draft model identical to the target proposes, for a seeded request, exactly the
    tokens the target then samples (same noise at the same output index), so every
    draft is kept; a greedy request's drafts are the argmax."""
    sampler = Sampler(vocab_size=V, eos_token_ids=[EOS], seed=0)
    sampler.add_request("s", SamplingParams(temperature=0.9, seed=21, max_tokens=8), [1])
    sampler.add_request("g", SamplingParams(temperature=0.0, max_tokens=8), [1])
    rows = torch.randn(3, V, generator=torch.Generator().manual_seed(1))
    drafts = {"s": [], "g": []}
    for j in range(3):
        tokens, probs = sampler.propose(rows[j : j + 1].repeat(2, 1), ["s", "g"], j)
        assert probs == [None, None], "seeded and greedy drafts are verified by comparison"
        drafts["s"].append(tokens[0])
        drafts["g"].append(tokens[1])
    assert drafts["g"] == rows.argmax(-1).tolist()
    logits = torch.cat([rows, rows[-1:], rows, rows[-1:]])  # each request: 3 drafts + 1 row
    out = sampler.verify(logits, ["s", "g"], [drafts["s"], drafts["g"]])
    assert [t for t, _ in out[0][:3]] == drafts["s"] and len(out[0]) == 4
    assert [t for t, _ in out[1][:3]] == drafts["g"] and len(out[1]) == 4


def test_argmax_by_max_picks_what_argmax_picks():
    """The sampler's argmax is torch.max's index (faster on CPU): the first of tied
    maxima, a NaN where a row has one, the first of several infinities, and the same as
    argmax over real vocabulary-wide rows in fp32 and bf16."""
    nan, inf = float("nan"), float("inf")
    rows = torch.tensor([[1.0, 3.0, 3.0], [1.0, nan, 3.0], [inf, 2.0, inf], [-inf, -inf, -inf], [0.0, 0.0, 0.0]])
    assert _argmax(rows).tolist() == rows.argmax(-1).tolist() == [1, 1, 0, 0, 0]
    wide = torch.randn(16, 49152, generator=torch.Generator().manual_seed(0))
    wide[3, 100] = wide[3, 200] = wide[3].max() + 1  # a tie at the top
    for x in (wide, wide.bfloat16()):
        assert torch.equal(_argmax(x), x.argmax(-1))
