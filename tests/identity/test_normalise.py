from identity.normalise import Identifier, extract_identifiers, normalise_email, normalise_phone


def test_email_variants_become_one_value():
    assert normalise_email("  Anna.Schmidt7@Gmail.COM ") == "anna.schmidt7@gmail.com"
    assert normalise_email("n/a") is None
    assert normalise_email("test@test.com") is None
    assert normalise_email(42) is None


def test_phone_formats_become_e164():
    assert normalise_phone("+49 30 12345678") == "+493012345678"
    assert normalise_phone("+4930 1234-5678") == "+493012345678"
    assert normalise_phone("030 12345678", "DE") == "+493012345678"
    assert normalise_phone("030 12345678") is None  # national format without a region
    assert normalise_phone("12") is None


def test_identifiers_are_collected_from_every_place_an_event_carries_them():
    event = {
        "type": "track",
        "userId": " u1 ",
        "anonymousId": "a1",
        "context": {"location": {"country": "DE"}, "traits": {"phone": "030 12345678"}},
        "properties": {"email": "X@Y.com"},
    }
    assert extract_identifiers(event) == [
        Identifier("user_id", "u1"),
        Identifier("anonymous_id", "a1"),
        Identifier("phone", "+493012345678"),
        Identifier("email", "x@y.com"),
    ]


def test_alias_previous_id_is_an_anonymous_id():
    ids = extract_identifiers({"type": "alias", "previousId": "anon-9", "userId": "u9"})
    assert Identifier("anonymous_id", "anon-9") in ids
