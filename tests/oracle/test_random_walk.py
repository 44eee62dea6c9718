"""random_walk: graph, exact optimum, hand-computed rewards, host/array agreement, behaviour quality."""

import itertools

import jax
import numpy as np
import pytest

from jaxrlhf.oracle import EOS_ID, decode_batch, get_task

TASK = get_task("random_walk", seed=0)
ORACLE = TASK.oracle
P, N = 2, TASK.max_response_tokens  # prompt room for an optional <bos>
SCORE_JIT = jax.jit(ORACLE.score_tokens)


def all_pairs_distances(adjacency):
    """Floyd–Warshall, independent of the BFS under test."""
    n = adjacency.shape[0]
    dist = np.where(adjacency, 1.0, np.inf)
    np.fill_diagonal(dist, 0.0)
    for k in range(n):
        dist = np.minimum(dist, dist[:, k : k + 1] + dist[k : k + 1, :])
    return dist


def test_graph_is_deterministic_and_reaches_the_goal():
    assert len(TASK.nodes) == 12 and len(TASK.tokenizer) <= 40
    dist = all_pairs_distances(TASK.adjacency)[:, TASK.goal]
    np.testing.assert_array_equal(dist, TASK.dist)
    assert np.all(np.isfinite(dist)) and dist.max() < TASK.max_path_nodes
    assert not TASK.adjacency.diagonal().any()
    same, other = get_task("random_walk", seed=0), get_task("random_walk", seed=1)
    np.testing.assert_array_equal(same.adjacency, TASK.adjacency)
    assert not np.array_equal(other.adjacency, TASK.adjacency) or other.goal != TASK.goal


def names(path):
    return " ".join(TASK.nodes[v] for v in path)


def successful_walks(start, length):
    """Every valid walk of exactly ``length`` steps that first reaches the goal at its end (DFS)."""
    found = []

    def extend(path, u):
        if len(path) == length:
            if u == TASK.goal:
                found.append(list(path))
            return
        for v in np.flatnonzero(TASK.adjacency[u]):
            if v != TASK.goal or len(path) == length - 1:
                extend([*path, int(v)], int(v))

    extend([], start)
    return found


def test_hand_computed_rewards():
    goal, l_max = TASK.goal, TASK.max_path_nodes
    start = int(np.argmax(TASK.dist))  # the farthest start
    d = int(TASK.dist[start])
    shortest = TASK.shortest_path(start)
    prompt = TASK.nodes[start]
    assert len(shortest) == d >= 3 and shortest[-1] == goal
    first = shortest[0]
    cases = {names(shortest): 1.0, "": -1.0}
    # detours: successful walks up to four steps longer than the shortest path
    detour_lengths = [n for n in range(d + 1, d + 5) if successful_walks(start, n)]
    assert len(detour_lengths) >= 2
    for n in detour_lengths:
        for walk in successful_walks(start, n)[:3]:
            cases[names(walk)] = (l_max - n) / (l_max - d)
    # an invalid first step: no valid prefix, no progress
    cases[names([int(np.flatnonzero(~TASK.adjacency[start])[0]), *shortest])] = -1.0
    # one step closer, then an invalid step, or a symbol that is no node
    one_step = -1.0 + 0.5 * (1 - (d - 1) / d)
    cases[names([first, int(np.flatnonzero(~TASK.adjacency[first])[0])])] = one_step
    cases[names([first]) + " <pad>"] = one_step
    # stopping one step short of the goal
    cases[names(shortest[:-1])] = -1.0 + 0.5 * (1 - 1 / d)
    # passing through the goal without stopping
    cases[names([*shortest, int(np.flatnonzero(TASK.adjacency[goal])[0])])] = -0.5
    texts = list(cases)
    scores = ORACLE.score_texts([prompt] * len(texts), texts)
    np.testing.assert_allclose(scores, np.float32(list(cases.values())), rtol=0, atol=1e-7)
    # the shortest path without eos is a failure that reached the goal
    assert ORACLE.score_texts([prompt], [names(shortest)], finished=[False])[0] == -0.5
    assert TASK.is_optimal(prompt, names(shortest)) and not TASK.is_optimal(prompt, names(shortest[:-1]))
    # a prompt with a leading <bos> has the same start
    assert ORACLE.score_texts(["<bos> " + prompt], [names(shortest)])[0] == 1.0


def test_a_valid_path_longer_than_max_path_nodes_fails():
    rng = np.random.default_rng(0)
    start = u = TASK.nodes.index(TASK.sample_prompts(0, 1)[0])
    walk = []
    while len(walk) < TASK.max_path_nodes:  # a random valid walk that avoids the goal
        u = int(rng.choice([v for v in np.flatnonzero(TASK.adjacency[u]) if v != TASK.goal]))
        walk.append(u)
    walk += TASK.shortest_path(u)
    assert len(walk) > TASK.max_path_nodes
    score = ORACLE.score_texts([TASK.nodes[start]], [names(walk)])[0]
    assert score == -0.5  # reached the goal, but too late


def enumerate_responses(max_len):
    nodes = range(len(TASK.nodes))
    return [list(seq) for k in range(max_len + 1) for seq in itertools.product(nodes, repeat=k)]


def test_oracle_optimum_is_the_bfs_shortest_path_for_every_start():
    """Score every node sequence of up to 3 symbols from every start (jitted array form)."""
    seqs = enumerate_responses(3)
    starts = [s for s in range(len(TASK.nodes)) if s != TASK.goal]
    prompts, responses = [], []
    for s in starts:
        prompts += [TASK.nodes[s]] * len(seqs)
        responses += [names(q) for q in seqs]
    tok = TASK.tokenizer
    prompt_tokens = np.array([[tok.convert_tokens_to_ids(p)] for p in prompts], np.int32)
    response_tokens = np.zeros((len(responses), 4), np.int32)
    response_mask = np.zeros_like(response_tokens, bool)
    for b, q in enumerate(seqs * len(starts)):
        ids = [4 + v for v in q] + [EOS_ID]
        response_tokens[b, : len(ids)], response_mask[b, : len(ids)] = ids, True
    scores = np.asarray(
        jax.jit(ORACLE.score_tokens)(
            prompt_tokens, np.ones_like(prompt_tokens, bool), response_tokens, response_mask
        )
    )
    scores = scores.reshape(len(starts), len(seqs))
    lengths = np.array([len(q) for q in seqs])
    for row, s in zip(scores, starts):
        d = TASK.dist[s]
        best = np.flatnonzero(row == row.max())
        if d <= 3:
            assert row.max() == 1.0
            assert np.all(lengths[best] == d)
            assert names(TASK.shortest_path(s)) in [names(seqs[i]) for i in best]
        else:
            assert row.max() < 0
    for s in starts:
        prompt = TASK.nodes[s]
        optimal = TASK.optimal_response(prompt)
        assert len(optimal.split()) == TASK.dist[s]
        assert ORACLE.score_texts([prompt], [optimal])[0] == 1.0
        assert TASK.is_optimal(prompt, optimal)


def random_valid_walks(rng, n):
    """Goal-biased random valid walks of random length, some through the goal, some too long."""
    prompts, responses = [], []
    for _ in range(n):
        u = int(rng.integers(len(TASK.nodes)))
        prompts.append(TASK.nodes[u])
        path = []
        for _ in range(int(rng.integers(0, N))):
            options = np.flatnonzero(TASK.adjacency[u])
            closer = options[TASK.dist[options] < TASK.dist[u]]
            u = int(rng.choice(closer if len(closer) and rng.random() < 0.5 else options))
            path.append(u)
            if u == TASK.goal and rng.random() < 0.7:
                break
        responses.append(names(path))
    return prompts, responses


@pytest.mark.parametrize("jit", [False, True])
def test_host_and_array_forms_agree(jit, encode, random_response_arrays):
    score = SCORE_JIT if jit else ORACLE.score_tokens
    rng = np.random.default_rng(1)
    batch = 96
    # random tokens (any symbol but eos, including <pad>/<bos>/<unk>) with random prompts
    prompts = [TASK.nodes[i] for i in rng.integers(len(TASK.nodes), size=batch)]
    pt, pm, _, _ = encode(
        TASK.tokenizer, prompts, [""] * batch, [False] * batch, P, N, bos_rows=range(0, batch, 3)
    )
    # ids past the tokenizer's vocabulary stand for a padded model vocabulary
    token_ids = [i for i in range(len(TASK.tokenizer)) if i != EOS_ID] + [len(TASK.tokenizer), 63]
    rt, rm = random_response_arrays(rng, batch, N, token_ids, EOS_ID)
    pt[1, 0], pm[1, 0] = 63, True  # an unknown id before the start reads as <unk> and is skipped
    arrays = (pt, pm, rt, rm)
    np.testing.assert_array_equal(score(*arrays), ORACLE.score_texts(*decode_batch(TASK.tokenizer, *arrays)))
    # random valid walks, finished or truncated
    prompts, responses = random_valid_walks(rng, batch)
    finished = list(rng.random(batch) < 0.8)
    arrays = encode(TASK.tokenizer, prompts, responses, finished, P, N + 2)
    host = ORACLE.score_texts(prompts, responses, finished)
    assert 0.2 < (host >= 0).mean() < 0.8  # successes and failures
    np.testing.assert_array_equal(score(*arrays), host)
    np.testing.assert_array_equal(host, ORACLE.score_texts(*decode_batch(TASK.tokenizer, *arrays)))
    # demonstrations
    demos = TASK.demonstrations(2, batch)
    prompts, completions = [d["prompt"] for d in demos], [d["completion"] for d in demos]
    arrays = encode(TASK.tokenizer, prompts, completions, [True] * batch, P, N, bos_rows=(0, 5))
    np.testing.assert_array_equal(score(*arrays), ORACLE.score_texts(prompts, completions))
    optimal = np.asarray(TASK.is_optimal_tokens(*arrays))
    np.testing.assert_array_equal(optimal, [TASK.is_optimal(p, c) for p, c in zip(prompts, completions)])


def test_demonstrations_are_parseable_and_mediocre():
    demos = TASK.demonstrations(0, 2000)
    assert demos == TASK.demonstrations(0, 2000)  # reproducible
    prompts, completions = [d["prompt"] for d in demos], [d["completion"] for d in demos]
    for p, c in zip(prompts, completions):
        assert p in TASK.nodes and p != TASK.nodes[TASK.goal]
        assert 1 <= len(c.split()) <= TASK.max_path_nodes
        assert all(w in TASK.nodes for w in c.split())
    gold = ORACLE.score_texts(prompts, completions)
    assert 0.15 <= gold.mean() <= 0.5
    assert gold.std() > 0.3
    optimal = gold == 1.0
    assert 0.15 <= optimal.mean() <= 0.6
    assert 0.1 <= (gold < 0).mean() <= 0.5
    assert ((gold >= 0) & (gold < 1)).mean() >= 0.1  # valid detours


def test_bad_prompt_arguments_and_describe():
    with pytest.raises(ValueError, match="n_nodes must be in"):
        get_task("random_walk", n_nodes=30)
    with pytest.raises(ValueError, match="max_path_nodes must be >= 2"):
        get_task("random_walk", max_path_nodes=1)
    with pytest.raises(ValueError, match="invalid_prob must be a probability"):
        get_task("random_walk", invalid_prob=1.5)
    with pytest.raises(ValueError, match="random_walk prompt 'Z': expected it to end with a node"):
        ORACLE.score_texts(["Z"], ["A"])
    assert TASK.describe().startswith("random_walk: 12-node graph")
