"""The project's own value pools for GSM-Symbolic templates (the published templates name them
in ``sample(...)`` calls but never define them).

Plain pools are lists of strings. Quantity pools hold (text, number) pairs: the text goes into
the question ("twice", "half"), the number into the arithmetic (2, 1/2). Fractions are exact
``Fraction`` values so conditions such as ``is_int(n * frac)`` never suffer float error.
"""

from __future__ import annotations

from fractions import Fraction as F

NAMES_MALE = [
    "James", "John", "Robert", "Michael", "David", "William", "Richard", "Joseph", "Thomas",
    "Charles", "Daniel", "Matthew", "Anthony", "Mark", "Paul", "Steven", "Andrew", "Kenji",
    "Joshua", "Kevin", "Brian", "George", "Tim", "Ronald", "Jason", "Ryan", "Jacob", "Gary",
    "Nicholas", "Eric", "Jonathan", "Stephen", "Larry", "Justin", "Scott", "Brandon", "Benjamin",
    "Samuel", "Gregory", "Alexander", "Patrick", "Frank", "Raymond", "Jack", "Dennis", "Jerry",
    "Tyler", "Aaron", "Jose", "Adam", "Nathan", "Henry", "Zachary", "Mateo", "Kyle", "Noah",
    "Ethan", "Jeremy", "Carlos", "Ahmed", "Ravi", "Luca", "Omar", "Hiroshi", "Diego", "Ivan",
]
NAMES_FEMALE = [
    "Mary", "Patricia", "Jennifer", "Linda", "Elizabeth", "Barbara", "Susan", "Jessica", "Sarah",
    "Karen", "Lisa", "Nancy", "Betty", "Sandra", "Margaret", "Ashley", "Kimberly", "Emily",
    "Donna", "Michelle", "Carol", "Amanda", "Melissa", "Deborah", "Stephanie", "Rebecca",
    "Sharon", "Laura", "Cynthia", "Amy", "Kathleen", "Angela", "Shirley", "Brenda", "Emma",
    "Anna", "Pamela", "Nicole", "Samantha", "Katherine", "Christine", "Helen", "Debra", "Rachel",
    "Carolyn", "Janet", "Maria", "Catherine", "Heather", "Diane", "Olivia", "Julie", "Joyce",
    "Victoria", "Ruth", "Virginia", "Lauren", "Kelly", "Christina", "Joan", "Evelyn", "Priya",
    "Fatima", "Yuki", "Sofia", "Aisha", "Mei", "Valeria", "Zoe", "Leila",
]
NAMES = NAMES_MALE + NAMES_FEMALE

CITIES = [
    "Los Angeles", "New York", "Chicago", "Houston", "Phoenix", "Seattle", "Denver", "Boston",
    "Miami", "Atlanta", "Dallas", "San Diego", "Portland", "Toronto", "London", "Paris", "Madrid",
    "Rome", "Berlin", "Tokyo", "Sydney", "Mumbai", "Cairo", "Lagos", "Lima", "Seoul",
]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "white", "black", "brown"]
FRUITS = [
    "apple", "banana", "orange", "pear", "peach", "plum", "mango", "pineapple", "grape",
    "lemon", "kiwi", "cherry", "apricot", "watermelon",
]
SPORTS = [
    "basketball", "soccer", "tennis", "volleyball", "baseball", "hockey", "swimming",
    "badminton", "cycling", "running",
]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
CURRENCIES_SYM = ["$", "€", "£", "¥", "₹"]
WEIGHTS_SM = ["ounce", "gram"]
WEIGHTS_MED = ["pound", "kilogram", "kg"]
LENGTH_LG = ["mile", "kilometer", "km"]

# (text, number) pools.
MULTI_TIMES = [("twice", 2), ("three times", 3), ("four times", 4), ("five times", 5)]
MULTIPLE_ICE = [("twice", 2), ("thrice", 3)]
MULTIPLE = [("double", 2), ("triple", 3), ("quadruple", 4)]
FRACTIONS = [
    ("half", F(1, 2)), ("a third", F(1, 3)), ("a quarter", F(1, 4)), ("a fifth", F(1, 5)),
    ("two-thirds", F(2, 3)), ("three-quarters", F(3, 4)), ("a tenth", F(1, 10)),
]
FRACTION_ALPH = [
    ("half", F(1, 2)), ("a third", F(1, 3)), ("a quarter", F(1, 4)), ("a fifth", F(1, 5)),
    ("a sixth", F(1, 6)), ("an eighth", F(1, 8)), ("a tenth", F(1, 10)),
]
FRACTION_ALNUM = [
    ("half", F(1, 2)), ("one-third", F(1, 3)), ("two-thirds", F(2, 3)), ("one-quarter", F(1, 4)),
    ("three quarters", F(3, 4)), ("one-fifth", F(1, 5)), ("two-fifths", F(2, 5)),
    ("three-fifths", F(3, 5)), ("1/3", F(1, 3)), ("1/4", F(1, 4)), ("1/5", F(1, 5)),
    ("1/8", F(1, 8)), ("1/10", F(1, 10)), ("1/16", F(1, 16)),
]
FRACTION_NUMS = [
    ("1/2", F(1, 2)), ("1/4", F(1, 4)), ("1/5", F(1, 5)), ("1/10", F(1, 10)),
    ("1/3", F(1, 3)), ("3/4", F(3, 4)), ("2/5", F(2, 5)), ("1/8", F(1, 8)),
]
FRACTION_DECIMALS = [
    ("0.1", F(1, 10)), ("0.2", F(1, 5)), ("0.25", F(1, 4)), ("0.3", F(3, 10)), ("0.4", F(2, 5)),
    ("0.5", F(1, 2)), ("0.6", F(3, 5)), ("0.75", F(3, 4)), ("0.05", F(1, 20)),
    ("0.15", F(3, 20)),
]

POOLS: dict[str, list] = {
    "names": NAMES,
    "names_male": NAMES_MALE,
    "names_female": NAMES_FEMALE,
    "cities": CITIES,
    "colors": COLORS,
    "fruits": FRUITS,
    "sports": SPORTS,
    "weekdays": WEEKDAYS,
    "currencies_sym": CURRENCIES_SYM,
    "weights_sm": WEIGHTS_SM,
    "weights_med": WEIGHTS_MED,
    "length_lg": LENGTH_LG,
    "multi_times": MULTI_TIMES,
    "multiple_ice": MULTIPLE_ICE,
    "multiple": MULTIPLE,
    "fractions": FRACTIONS,
    "fraction_alph": FRACTION_ALPH,
    "fraction_alnum": FRACTION_ALNUM,
    "fraction_nums": FRACTION_NUMS,
    "fraction_decimals": FRACTION_DECIMALS,
}
