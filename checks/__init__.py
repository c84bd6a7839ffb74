"""The exercise checks: one ``check_*`` per exercise of the notebooks, called in its check cell
(``from checks import check_fits``) and by the grader (``tools/grade.py``). Apart from
``course_lib`` because they grade it: they use every layer of the library, and nothing in the
library uses them."""
from checks.chapters_00_04 import (
    check_admit,
    check_continuous_schedule,
    check_crossover_batch,
    check_decode_intensity,
    check_fits,
    check_kv_cache_bytes,
    check_left_pad,
    check_prefill_mask,
    check_rms_norm,
    check_slot_utilisation,
    check_static_schedule,
    check_ttft_tpot,
)
from checks.chapters_05_09 import (
    check_admission_rule,
    check_allocator,
    check_block_key,
    check_block_manager,
    check_block_slot,
    check_chunk_sizes,
    check_combine_splits,
    check_cu_seqlens,
    check_head_rows,
    check_packed_inputs,
    check_packed_mask,
    check_percentile_latency,
    check_steps_to_prefill,
    check_tile_slots,
    check_tiles_to_read,
    check_token_budget_step,
    check_victim,
)

__all__ = [name for name in dir() if name.startswith("check_")]
