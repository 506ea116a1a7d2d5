"""The one way the package derives a seed from several integers (a base seed, a step, a rank,
a call index, ...): a seed for one (step, rank, ...) that does not depend on what ran before, so
resumed runs draw exactly what the uninterrupted run drew."""


def derive_seed(*parts: int) -> int:
    """Fold the parts into one seed in [0, 2**62); derive_seed(a, b) == a * 1_000_003 + b while
    that is below 2**62. torch's CPU generator keeps only the low 32 bits of a seed; those are
    still one-to-one in the last part for fixed earlier parts (1_000_003 is odd), so consecutive
    steps, ranks or epochs never share a random stream."""
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2 ** 62)
    return seed
