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


def test_placeholder_and_non_text_ids_are_no_identifiers_and_repeats_count_once():
    for _ in range(2):  # the second time from the ids' cache: the same answers
        assert extract_identifiers({"userId": " N/A ", "anonymousId": ["a1"]}) == []
        assert extract_identifiers({"userId": "   ", "anonymousId": 7}) == []
        assert extract_identifiers(
            {"type": "alias", "userId": "u1", "anonymousId": " u1", "previousId": "u1 "}
        ) == [Identifier("user_id", "u1"), Identifier("anonymous_id", "u1")]


def test_segment_device_ids_become_identity_record_fields():
    from identity.records import record_from_event

    event = {
        "type": "track",
        "event": "App Opened",
        "anonymousId": "anon-1",
        "context": {
            "device": {
                "id": " B5372DB0-C21E-11E4-8DFC-AA07A5B093DB ",
                "advertisingId": "7A3CBEA0-BDF5-11E4-8DFC-AA07A5B093DB",
                "type": "ios",
            }
        },
    }
    record = record_from_event(event)
    assert record["device_id"] == "b5372db0-c21e-11e4-8dfc-aa07a5b093db"
    assert record["advertising_id"] == "7a3cbea0-bdf5-11e4-8dfc-aa07a5b093db"
    event["context"]["device"]["advertisingId"] = "00000000-0000-0000-0000-000000000000"
    assert record_from_event(event)["advertising_id"] is None


def test_repeated_events_give_equal_records_that_do_not_share_state():
    from identity.records import RECORD_FIELDS, normalise_record, record_from_event

    event = {
        "type": "identify",
        "userId": "u1",
        "traits": {"email": " Ann@Example.org ", "firstName": "Zoë", "address": {"country": "de"}},
        "context": {"location": {"country": "DE"}, "traits": {"phone": "030 12345678"}},
    }
    first = record_from_event(event)
    first["email"] = "changed"  # a caller's change never reaches the next event's record
    second = record_from_event(event)
    assert second["email"] == "ann@example.org"
    assert second["phone"] == "+493012345678" and second["first_name"] == "zoe"
    assert list(second) == list(RECORD_FIELDS)
    # Equal but not the same identifier: 1 is an id, True is not.
    assert record_from_event({"type": "track", "userId": 1})["user_id"] == "1"
    assert record_from_event({"type": "track", "userId": True})["user_id"] is None
    # Values that cannot be a cache key are normalised all the same.
    odd = {"type": "track", "userId": "u2", "properties": {"email": ["x@y.com"], "phone": {}}}
    assert record_from_event(odd) == normalise_record({"user_id": "u2", "email": ["x@y.com"]})


def test_records_from_the_caches_keep_each_events_own_values():
    """Records are assembled from cached parts (ids, statements, each text): every part
    still comes from its own event: the region reads into a phone, the ids are the event's."""
    from identity.records import identity_record, normalise_record, record_id_of

    def identify(anonymous: str, country: str) -> dict:
        return {
            "type": "identify",
            "anonymousId": anonymous,
            "traits": {"phone": "030 12345678", "firstName": "Zoë"},
            "context": {"location": {"country": country}},
        }

    german, _ = identity_record(identify("a1", "DE"))
    assert german["phone"] == "+493012345678" and german["anonymous_id"] == "a1"
    # The same statements from another device in another country: its id, its region.
    french, _ = identity_record(identify("a2", "FR"))
    assert french["phone"] is None and french["anonymous_id"] == "a2"
    assert french["first_name"] == german["first_name"] == "zoe"
    # Without a phone the region changes nothing.
    quiet = {"type": "identify", "anonymousId": "a3", "traits": {"lastName": "Ng"}}
    here, _ = identity_record({**quiet, "context": {"location": {"country": "DE"}}})
    there, there_id = identity_record({**quiet, "context": {"location": {"country": "US"}}})
    assert here == there and there_id == record_id_of(there)
    # Ids alone: equal keys that are not the same identifier stay apart.
    for user_id, expected in ((1, "1"), (True, None), (1.0, "1"), (" u7 ", "u7")):
        record, record_id = identity_record({"type": "track", "userId": user_id})
        assert record == normalise_record({"user_id": user_id})
        assert record["user_id"] == expected and record_id == record_id_of(record)
    # First found wins: traits before context.traits before properties; an empty value
    # is not found; within a source, first_name before firstName.
    record, _ = identity_record(
        {
            "type": "identify",
            "traits": {"email": "", "first_name": "Ann", "firstName": "Bea"},
            "context": {"traits": {"email": "C@d.org", "lastName": "Lee"}},
            "properties": {"email": "e@f.org", "last_name": "Kim", "dob": "2999-01-01"},
        }
    )
    assert (record["email"], record["first_name"], record["last_name"]) == ("c@d.org", "ann", "lee")
    assert record["dob"] is None  # after today: not a birth date
