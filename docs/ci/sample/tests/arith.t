# Arithmetic the calculator must get right.
test addition: 1 + 2 = 3
test precedence: 2 + 3 * 4 = 14
test parentheses: (2 + 3) * 4 = 20
test unary minus: -3 * -3 = 9
test integer division: 7 / 2 = 3
