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
            expected = (sr.prompt_token_ids + sr.output_token_ids)[:end]
            assert seq == expected, f"{sr.req_id}: KV cache content differs from the request's tokens"
            if sr.sample:
                out.req_ids.append(sr.req_id)
                out.sampled_token_ids.append(next_token(seq))
                out.logprobs.append(None)
        return out
