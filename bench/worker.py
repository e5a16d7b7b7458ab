"""``python -m bench.worker CASE_JSON OUT_JSON``: run one case in this fresh process (see measure.py)."""

import sys

from bench.measure import OVER_LIMIT, CaseResult, CaseSpec, run_case, write_result


def main() -> None:
    spec = CaseSpec.from_json(sys.argv[1])
    out = sys.argv[2]

    def over_limit(above: int) -> None:
        reason = (
            f"{OVER_LIMIT}: {above / 2**30:.2f} GiB above the inputs > {spec.mem_limit_bytes / 2**30:.2f} GiB"
        )
        write_result(CaseResult("error", reason=reason, peak_mem_bytes=above, over_limit=True), out)

    write_result(run_case(spec, on_over_limit=over_limit), out)


if __name__ == "__main__":
    main()
