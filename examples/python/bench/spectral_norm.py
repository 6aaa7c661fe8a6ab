"""The spectral norm of an infinite matrix, by power iteration: function calls and float arithmetic.

A workload of `invoke bench python-<v>` (recipes/python.yaml). Prints the norm (1.274224... for
large sizes), so a wrong result shows.
"""
import math
import sys


def entry(i, j):
    # A[i][j] = 1 / ((i + j)(i + j + 1) / 2 + i + 1)
    return 1.0 / ((i + j) * (i + j + 1) // 2 + i + 1)


def times(vector):
    n = len(vector)
    return [sum(entry(i, j) * vector[j] for j in range(n)) for i in range(n)]


def times_transposed(vector):
    n = len(vector)
    return [sum(entry(j, i) * vector[j] for j in range(n)) for i in range(n)]


def main(n):
    u = [1.0] * n
    for _ in range(10):
        v = times_transposed(times(u))
        u = times_transposed(times(v))
    vbv = sum(a * b for a, b in zip(u, v, strict=True))
    vv = sum(b * b for b in v)
    print(f"{math.sqrt(vbv / vv):.9f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 250)
