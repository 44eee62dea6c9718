"""Random walks to a goal on a small random directed graph.

Nodes are letters ``A, B, ...``; one of them is the goal. The prompt is the start node (``"C"``), the
response the nodes visited *after* the start, ending at the goal (``"F B G"``), then eos.

Gold reward, with L = number of response nodes, d = BFS distance from start to goal and
L_max = ``max_path_nodes``:

* success — every step is an edge, the walk stops (eos) the first time it reaches the goal, L ≤ L_max:
  R* = (L_max − L)/(L_max − d) ∈ [0, 1], exactly 1 for a shortest path;
* failure — an invalid step (no such edge, or a non-node token), no eos, stopping short of the goal,
  passing through the goal without stopping, or L > L_max:
  R* = −1 + ½·max(0, max over the valid prefix of progress(v)), progress(v) = 1 − dist(v)/d,
  so R* ∈ [−1, −½]: a failed walk that got closer to the goal scores higher, which gives RL a gradient
  before it finds any complete path, while any success beats any failure.

(Prompts never start at the goal; if one does, the empty response is the optimum, R* = 1.)
"""

from __future__ import annotations

import string
from collections import deque

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.oracle.base import Oracle, check_text_batch, check_token_batch, response_body, token_lookup
from jaxrlhf.oracle.task_tokenizer import EOS_ID, SPECIAL_TOKENS, build_task_tokenizer
from jaxrlhf.oracle.tasks.base import Task, as_generator, register_task


def distances_to(adjacency: np.ndarray, goal: int) -> np.ndarray:
    """BFS distance from every node to ``goal`` along directed edges (−1 where unreachable)."""
    dist = np.full(adjacency.shape[0], -1, np.int64)
    dist[goal] = 0
    queue = deque([goal])
    while queue:
        v = queue.popleft()
        for u in np.flatnonzero(adjacency[:, v]):
            if dist[u] < 0:
                dist[u] = dist[v] + 1
                queue.append(u)
    return dist


class RandomWalkOracle(Oracle):
    """Gold reward of a walk on a fixed graph (formula in the module docstring). Jittable."""

    jittable = True

    def __init__(self, nodes, adjacency: np.ndarray, goal: int, max_path_nodes: int, vocab: dict[str, int]):
        self.name = "random_walk"
        self.nodes = list(nodes)
        self.adjacency = np.asarray(adjacency, bool)
        self.goal = int(goal)
        self.max_path_nodes = int(max_path_nodes)
        self.dist = distances_to(self.adjacency, self.goal)
        self.index = {name: i for i, name in enumerate(self.nodes)}
        n, l_max = len(self.nodes), self.max_path_nodes
        # Tables shared by both forms make them agree to the last bit.
        length = np.arange(l_max + 1)
        self.success_table = ((l_max - length[None, :]) / (l_max - self.dist[:, None])).astype(np.float32)
        d_start = np.maximum(self.dist[:, None], 1)
        progress = np.clip(1.0 - self.dist[None, :] / d_start, 0.0, 1.0)
        progress[self.dist == 0] = (np.arange(n) == self.goal)[None, :]  # start at the goal
        self.failure_table = (-1.0 + 0.5 * progress).astype(np.float32)
        vocab_size = max(vocab.values()) + 1
        self.node_of_token = np.full(vocab_size, -1, np.int32)
        self.special_token = np.zeros(vocab_size, bool)
        for token, token_id in vocab.items():
            if token in self.index:
                self.node_of_token[token_id] = self.index[token]
            self.special_token[token_id] = token in SPECIAL_TOKENS

    def start_node(self, prompt: str) -> int:
        """The start node of a prompt: its last non-special symbol, which must be a node."""
        words = [w for w in prompt.split() if w not in SPECIAL_TOKENS]
        if not words or words[-1] not in self.index:
            raise ValueError(f"random_walk prompt {prompt!r}: expected it to end with a node in {self.nodes}")
        return self.index[words[-1]]

    def _score_walk(self, start: int, response: str, finished: bool) -> np.float32:
        path = [self.index.get(w, -1) for w in response.split()]
        length, valid, prev = len(path), 0, start
        for v in path:
            if v < 0 or not self.adjacency[prev, v]:
                break
            valid, prev = valid + 1, v
        seq = [start, *path]
        first_goal = seq.index(self.goal) if self.goal in seq else -1
        if finished and valid == length and first_goal == length and length <= self.max_path_nodes:
            return self.success_table[start, length]
        return max([np.float32(-1.0)] + [self.failure_table[start, v] for v in path[:valid]])

    def score_texts(self, prompts, responses, finished=None) -> np.ndarray:
        finished = check_text_batch(prompts, responses, finished)
        return np.array(
            [self._score_walk(self.start_node(p), r, f) for p, r, f in zip(prompts, responses, finished)],
            np.float32,
        )

    def score_tokens(self, prompt_tokens, prompt_mask, response_tokens, response_mask) -> jax.Array:
        """Array form; a prompt without a real node token scores −1 (the host form raises instead)."""
        check_token_batch(prompt_tokens, prompt_mask, response_tokens, response_mask)
        prompt_tokens, response_tokens = jnp.asarray(prompt_tokens), jnp.asarray(response_tokens)
        n_prompt, n_response = prompt_tokens.shape[1], response_tokens.shape[1]
        # START: the last real, non-special prompt token.
        real = jnp.asarray(prompt_mask, bool) & ~token_lookup(self.special_token, prompt_tokens, True)
        last = n_prompt - 1 - jnp.argmax(real[:, ::-1], axis=1)
        start = token_lookup(
            self.node_of_token, jnp.take_along_axis(prompt_tokens, last[:, None], axis=1)[:, 0], -1
        )
        start = jnp.where(real.any(axis=1), start, -1)
        safe_start = jnp.maximum(start, 0)
        # WALK: steps along edges until the first invalid one.
        length, finished = response_body(response_tokens, response_mask, EOS_ID)
        in_body = jnp.arange(n_response)[None, :] < length[:, None]  # [B, N]
        node = token_lookup(self.node_of_token, response_tokens, -1)  # [B, N], −1 for non-nodes
        prev = jnp.concatenate([start[:, None], node[:, :-1]], axis=1)
        edge = jnp.asarray(self.adjacency)[jnp.maximum(prev, 0), jnp.maximum(node, 0)]
        bad = in_body & ~((node >= 0) & (prev >= 0) & edge)
        valid = jnp.where(bad.any(axis=1), jnp.argmax(bad, axis=1), length)
        at_goal = in_body & (node == self.goal)
        first_goal = jnp.where(
            start == self.goal, 0, jnp.where(at_goal.any(axis=1), jnp.argmax(at_goal, axis=1) + 1, -1)
        )
        # SCORE
        success = (
            (start >= 0)
            & finished
            & (valid == length)
            & (first_goal == length)
            & (length <= self.max_path_nodes)
        )
        success_score = jnp.asarray(self.success_table)[safe_start, jnp.minimum(length, self.max_path_nodes)]
        in_prefix = jnp.arange(n_response)[None, :] < valid[:, None]
        progress = jnp.asarray(self.failure_table)[safe_start[:, None], jnp.maximum(node, 0)]
        failure_score = jnp.maximum(jnp.max(jnp.where(in_prefix, progress, -1.0), axis=1), -1.0)
        score = jnp.where(success, success_score, failure_score)
        return jnp.where(start >= 0, score, -1.0).astype(jnp.float32)


@register_task
class RandomWalkTask(Task):
    """Walk from the prompt's start node to the goal; behaviour = goal-biased noisy random walks.

    Behaviour policy, per step from node u: with probability ``invalid_prob`` a random non-neighbour
    (an invalid step; the walk goes on from there), else with probability ``greedy_prob`` a random
    neighbour closer to the goal, else a uniformly random neighbour. It stops at the goal or after
    ``max_path_nodes`` nodes. How good that is depends a lot on the graph, so by default
    (``greedy_prob=None``) ``greedy_prob`` is calibrated by bisection so that the behaviour's mean gold
    reward is about ``behaviour_gold`` on every seed (estimated from 400 walks with fixed random numbers).
    """

    name = "random_walk"
    # One graph, one goal: as many prompts as start nodes, too few to split. Every split draws from all of
    # them, and a report of the prompt lists shows the overlap.
    disjoint_splits = False

    def __init__(
        self,
        seed: int = 0,
        n_nodes: int = 12,
        min_out_degree: int = 2,
        max_out_degree: int = 3,
        max_path_nodes: int = 10,
        greedy_prob: float | None = None,
        invalid_prob: float = 0.04,
        behaviour_gold: float = 0.35,
    ):
        if not 3 <= n_nodes <= 26:
            raise ValueError(f"n_nodes must be in [3, 26], got {n_nodes}")
        if not 1 <= min_out_degree <= max_out_degree <= n_nodes - 1:
            raise ValueError(
                f"need 1 <= min_out_degree <= max_out_degree <= n_nodes - 1, got {min_out_degree}, "
                f"{max_out_degree} with n_nodes={n_nodes}"
            )
        if max_path_nodes < 2:
            raise ValueError(f"max_path_nodes must be >= 2, got {max_path_nodes}")
        for arg, p in (("greedy_prob", greedy_prob), ("invalid_prob", invalid_prob)):
            if p is not None and not 0.0 <= p <= 1.0:
                raise ValueError(f"{arg} must be a probability, got {p}")
        self.seed, self.invalid_prob = seed, invalid_prob
        self.nodes = list(string.ascii_uppercase[:n_nodes])
        adjacency, goal = self._build_graph(
            np.random.default_rng(seed), n_nodes, min_out_degree, max_out_degree, max_path_nodes
        )
        self.tokenizer = build_task_tokenizer(self.nodes, model_max_length=1 + max_path_nodes + 1)
        self.oracle = RandomWalkOracle(
            self.nodes, adjacency, goal, max_path_nodes, self.tokenizer.get_vocab()
        )
        self.adjacency, self.goal, self.dist = adjacency, goal, self.oracle.dist
        self.max_path_nodes = max_path_nodes
        self.max_prompt_tokens = 1
        self.max_response_tokens = max_path_nodes + 1
        # Python lists: the behaviour walk takes one step per call and NumPy's per-call overhead dominates.
        self._neighbours = [np.flatnonzero(row).tolist() for row in adjacency]
        self._non_neighbours = [np.flatnonzero(~row).tolist() for row in adjacency]
        self._closer_neighbours = [
            [v for v in vs if self.dist[v] < self.dist[u]] for u, vs in enumerate(self._neighbours)
        ]
        if greedy_prob is None:
            greedy_prob = self._calibrate_greedy_prob(behaviour_gold)
        self.greedy_prob = greedy_prob

    @staticmethod
    def _build_graph(rng, n_nodes, min_degree, max_degree, max_path_nodes) -> tuple[np.ndarray, int]:
        """Draw graphs until every node reaches the goal in < ``max_path_nodes`` steps.

        Graphs whose starts mostly neighbour the goal are too easy to show learning, so the farthest
        start must be ≥ ``depth`` steps away and the mean start ≥ 0.6·``depth`` (``depth`` = 4 for 12+
        nodes).
        """
        depth = min(4, n_nodes // 3 + 1, max_path_nodes - 1)
        if min_degree == n_nodes - 1:
            depth = 1  # a complete graph
        for _ in range(2000):
            adjacency = np.zeros((n_nodes, n_nodes), bool)
            for u in range(n_nodes):
                others = np.delete(np.arange(n_nodes), u)
                degree = rng.integers(min_degree, max_degree + 1)
                adjacency[u, rng.choice(others, size=degree, replace=False)] = True
            goal = int(rng.integers(n_nodes))
            dist = distances_to(adjacency, goal)
            mean_start = dist.sum() / (n_nodes - 1)
            if dist.min() >= 0 and depth <= dist.max() < max_path_nodes and mean_start >= 0.6 * depth:
                return adjacency, goal
        raise ValueError(
            f"no graph with {n_nodes} nodes and out-degree {min_degree}..{max_degree} whose nodes all reach "
            f"the goal in fewer than {max_path_nodes} steps, the farthest in >= {depth}; try other parameters"
        )

    def draw_prompts(self, rng, n: int) -> list[str]:
        rng = as_generator(rng)
        starts = [i for i in range(len(self.nodes)) if i != self.goal]
        return [self.nodes[i] for i in rng.choice(starts, size=n)]

    def prompt_space_size(self) -> int:
        return len(self.nodes) - 1

    def _behaviour_walk(self, rng: np.random.Generator, start: int, greedy_prob: float) -> list[int]:
        path, u = [], start
        while u != self.goal and len(path) < self.max_path_nodes:
            r, pick = rng.random(2)
            if r < self.invalid_prob:
                options = self._non_neighbours[u]
            elif r < self.invalid_prob + (1 - self.invalid_prob) * greedy_prob:
                options = self._closer_neighbours[u]
            else:
                options = self._neighbours[u]
            u = options[int(pick * len(options))]
            path.append(u)
        return path

    def _calibrate_greedy_prob(self, target_gold: float, n_walks: int = 400, steps: int = 7) -> float:
        """Bisect greedy_prob so that the behaviour's mean gold ≈ ``target_gold`` (deterministic)."""
        starts = np.array([i for i in range(len(self.nodes)) if i != self.goal])
        low, high = 0.0, 1.0
        for _ in range(steps):
            mid = (low + high) / 2
            rng = np.random.default_rng([self.seed, 1])  # the same random numbers at every probe
            prompts = [self.nodes[s] for s in rng.choice(starts, size=n_walks)]
            walks = [
                " ".join(self.nodes[v] for v in self._behaviour_walk(rng, self.nodes.index(p), mid))
                for p in prompts
            ]
            if self.oracle.score_texts(prompts, walks).mean() < target_gold:
                low = mid
            else:
                high = mid
        return (low + high) / 2

    def behaviour_response(self, rng, prompt: str) -> str:
        start = self.oracle.start_node(prompt)
        return " ".join(self.nodes[v] for v in self._behaviour_walk(rng, start, self.greedy_prob))

    def shortest_path(self, start: int) -> list[int]:
        """The BFS shortest path from ``start`` (excluded) to the goal; ties go to the earlier letter."""
        path, u = [], start
        while u != self.goal:
            u = int(next(v for v in np.flatnonzero(self.adjacency[u]) if self.dist[v] == self.dist[u] - 1))
            path.append(u)
        return path

    def optimal_response(self, prompt: str) -> str:
        return " ".join(self.nodes[v] for v in self.shortest_path(self.oracle.start_node(prompt)))

    def describe(self) -> str:
        edges = int(self.adjacency.sum())
        starts = self.dist[np.arange(len(self.nodes)) != self.goal]
        return (
            f"random_walk: {len(self.nodes)}-node graph ({edges} edges, seed {self.seed}), goal "
            f"{self.nodes[self.goal]}, shortest paths {starts.min()}-{starts.max()} steps; "
            f"prompt = start node, response = path to the goal + eos; "
            f"R* = ({self.max_path_nodes} - len)/({self.max_path_nodes} - shortest) "
            "for a valid stopped path, -1 + progress/2 otherwise"
        )
