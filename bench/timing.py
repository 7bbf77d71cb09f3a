"""Side-by-side timing for the benchmarks: two pieces of work alternated in each round, so that a
busy machine slows both alike and their ratio stays meaningful (CPU timings are noisy)."""
import statistics
import time


def median_ratio(numerator, denominator, rounds):
    """Median over rounds of time(numerator) / time(denominator), the two run alternately in each
    round; also the median time of each."""
    ratios, times = [], ([], [])
    for _ in range(rounds):
        for f, log in ((numerator, times[0]), (denominator, times[1])):
            start = time.perf_counter()
            f()
            log.append(time.perf_counter() - start)
        ratios.append(times[0][-1] / times[1][-1])
    return statistics.median(ratios), statistics.median(times[0]), statistics.median(times[1])


def fastest(run, times):
    """The shortest of `times` wall times of run(), in seconds."""
    best = float("inf")
    for _ in range(times):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best
