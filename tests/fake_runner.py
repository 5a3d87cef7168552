"""A torch-free stand-in for the model runner, for scheduler tests.

It simulates the paged KV cache slot by slot: every computed token is written to the slot its
block table gives, and every step checks that the slots of all earlier positions hold exactly the
request's earlier tokens. So a wrong block table, a bad prefix-cache hit or a block reused while
still in use fails loudly. The "model" is a deterministic function of the whole sequence, so
recomputation after preemption must reproduce the same tokens.
"""

from __future__ import annotations

from tureen.engine.messages import ModelRunnerOutput, SchedulerOutput

VOCAB = 1000


def next_token(seq: list[int]) -> int:
    h = 0
    for t in seq:
        h = (h * 31 + t + 7) % 1_000_003
    return h % VOCAB


class FakeRunner:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.slots: list[tuple[int, int] | None] = [None] * (num_blocks * block_size)  # (pos, token)
        self.steps: list[SchedulerOutput] = []

    def slot(self, block_ids: list[int], pos: int) -> int:
        return block_ids[pos // self.block_size] * self.block_size + pos % self.block_size

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self.steps.append(sched)
        out = ModelRunnerOutput()
        for sr in sched.requests:  # write every token first, like the real runner
            for k, tok in enumerate(sr.token_ids):
                self.slots[self.slot(sr.block_ids, sr.start_pos + k)] = (sr.start_pos + k, tok)
        for sr in sched.requests:
            end = sr.start_pos + sr.num_tokens
            seq = []
            for pos in range(end):
                entry = self.slots[self.slot(sr.block_ids, pos)]
                assert entry is not None and entry[0] == pos, f"{sr.req_id}: slot for pos {pos} holds {entry}"
                seq.append(entry[1])
            expected = (sr.prompt_token_ids + sr.output_token_ids + sr.spec_token_ids)[:end]
            assert seq == expected, f"{sr.req_id}: KV cache content differs from the request's tokens"
            if sr.sample:
                out.req_ids.append(sr.req_id)
                out.sampled_token_ids.append(self._verify(seq, sr.spec_token_ids))
                out.logprobs.append([None] * len(out.sampled_token_ids[-1]))
        return out

    @staticmethod
    def _verify(seq: list[int], drafts: list[int]) -> list[int]:
        """Greedy verification: keep drafts while they equal the model's token, then add its own."""
        known = len(seq) - len(drafts)
        new = []
        for j in range(len(drafts) + 1):
            token = next_token(seq[:known + j])
            new.append(token)
            if j == len(drafts) or drafts[j] != token:
                return new
        return new


class FakeExecutor(FakeRunner):
    """``FakeRunner`` with the whole ``Executor`` shape, so the real ``LLMEngine`` can drive it.

    ``on_execute`` (optional) runs at the start of every step with the step's SchedulerOutput: tests
    use it to raise (a failing model step) or to act while a step is in flight (an abort).
    """

    max_position_embeddings = 4096
    kv_bytes_per_token = 64

    def __init__(self, num_blocks: int = 64, block_size: int = 16, vocab_size: int = VOCAB) -> None:
        super().__init__(num_blocks, block_size)
        self.vocab_size = vocab_size
        self.num_blocks = num_blocks
        self.on_execute = None

    def kv_cache_description(self) -> str:
        return "fake"

    def determine_num_blocks(self) -> int:
        return self.num_blocks

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.slots = [None] * (num_blocks * self.block_size)

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        if self.on_execute is not None:
            self.on_execute(sched)
        return super().execute(sched)
