# Left to right for operators of the same precedence.
test subtraction is left-associative: 10 - 4 - 3 = 3
test division is left-associative: 100 / 10 / 5 = 2
