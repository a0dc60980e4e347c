"""The accuracy measures the identity bench reports."""

from identity.evaluate import evidence_ceiling
from identity.records import normalise_record


def test_the_ceiling_keeps_apart_records_of_one_person_that_share_only_names():
    rows = [
        ("a1", normalise_record({"first_name": "Ada", "last_name": "Lind", "dob": "1990-01-02"})),
        ("a2", normalise_record({"first_name": "Ada", "last_name": "Lind", "dob": "02/01/1990"})),
        (
            "a3",
            normalise_record({"first_name": "Ada", "last_name": "Lind", "phone": "+14155552671"}),
        ),
        ("b1", normalise_record({"first_name": "Bo", "last_name": "Lind", "dob": "1990-01-02"})),
    ]
    truth = {"a1": "A", "a2": "A", "a3": "A", "b1": "B"}
    ceiling = evidence_ceiling(rows, truth)
    # a1-a2 share a birth date; a3 shares only the names; b1's birth date is another person's.
    assert ceiling.precision == 1.0
    assert ceiling.recall == 1 / 3
    assert ceiling.predicted_clusters == 3
