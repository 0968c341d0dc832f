"""The job functions every framework runs. Self-contained (no imports, no globals), because
dispy ships a function as its source text and the others pickle it."""


def inc(x):
    """A: trivial job."""
    return x + 1


def echo(data):
    """C: returns a payload as large as it received (a new object, so it is really sent back)."""
    return bytes(data)


def echo_array(array):
    """C (NumPy): returns the array it received (unpickled here, pickled again to go back)."""
    return array


def spin(n):
    """E: pure-Python CPU work, ``n`` iterations (calibrated by the caller to 0.5 s)."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return total
