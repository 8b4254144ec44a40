// C++ unit tests of the step segmenter core (no test framework: each CHECK reports its line; exit status = failures).
#include <cstdio>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "segmenter.h"

using namespace stepsearch;

namespace {

int failures = 0;

#define CHECK(condition)                                                        \
  do {                                                                          \
    if (!(condition)) {                                                         \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #condition); \
      ++failures;                                                               \
    }                                                                           \
  } while (0)

// A sequence whose i-th token is `pieces[i]` (a table holding exactly those pieces, ids 0..n-1).
struct Segmented {
  SequenceResult result;
  std::vector<uint8_t> mask;
};

Segmented segment_pieces(const std::vector<std::string>& pieces, const std::vector<uint8_t>& strips = {},
                         const InsertedSpans& spans = InsertedSpans{}) {
  const std::vector<uint8_t> flags = strips.empty() ? std::vector<uint8_t>(pieces.size(), 0) : strips;
  const TokenTable table(pieces, flags);
  std::vector<int32_t> ids(pieces.size());
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>(i);
  Segmented out;
  out.mask.assign(ids.size(), 7);
  Scratch scratch;
  segment_sequence(table, ids.data(), static_cast<int64_t>(ids.size()), spans, out.mask.data(), out.result, scratch);
  return out;
}

std::vector<std::string> split_every_byte(const std::string& text) {
  std::vector<std::string> pieces;
  for (const char c : text) pieces.emplace_back(1, c);
  return pieces;
}

void test_tag_split_at_every_point() {
  for (const char* name : kTagNames) {
    const std::string tag(name);
    for (size_t cut = 0; cut <= tag.size(); ++cut) {
      const Segmented s = segment_pieces({"ab" + tag.substr(0, cut), tag.substr(cut) + "cd"});
      CHECK(s.result.tags.size() == 1);
      if (s.result.tags.size() != 1) continue;
      const Tag& found = s.result.tags[0];
      CHECK(std::string(kTagNames[found.kind]) == tag);
      CHECK(found.start_byte == 2 && found.end_byte == static_cast<int64_t>(2 + tag.size()));
      CHECK(found.start_token == (cut == 0 ? 1 : 0));
      CHECK(found.end_token == (cut == tag.size() ? 0 : 1));
    }
  }
}

void test_near_misses_and_restart() {
  const Segmented s = segment_pieces({"<sea<sear", "ch> </searc", "x </search", ">"});
  CHECK(s.result.tags.size() == 2);
  CHECK(s.result.tags[0].kind == kSearchOpen && s.result.tags[0].start_byte == 4);
  CHECK(s.result.tags[1].kind == kSearchClose && s.result.tags[1].start_token == 2 && s.result.tags[1].end_token == 3);
  CHECK(s.result.queries.size() == 1 && s.result.queries[0] == " </searcx ");
  CHECK(segment_pieces({"<<think>>", "< think>", "<THINK>", "</ think>"}).result.tags.size() == 1);
}

void test_steps_masks_and_queries() {
  const Segmented s = segment_pieces({"<think>t</think>", "<search> q1 </search>", " \n", "<information>",
                                      "doc", "</information>", "<search>q2</search>x<information>d</information>",
                                      "</search><information>e"});
  CHECK(s.result.step_ends.size() == 2);
  CHECK(s.result.step_ends[0] == 1);
  CHECK(s.result.step_ends[1] == 7);           // the unpaired `</search>` in the last token
  CHECK(s.result.step_query.size() == 2 && s.result.step_query[0] == 0 && s.result.step_query[1] == -1);
  CHECK(s.result.queries.size() == 2 && s.result.queries[0] == " q1 " && s.result.queries[1] == "q2");
  // token 2 is whitespace next to a block; token 6 overlaps a block; 7's block is unclosed
  const std::vector<uint8_t> expected = {1, 1, 0, 0, 0, 0, 0, 0};
  CHECK(s.mask == expected);
}

void test_tags_inside_information_are_data() {
  const Segmented s = segment_pieces({"<search>a</search>", "<information>", "<search>b</search><information>",
                                      "<answer>z</answer>", "</information>", "<answer>y</answer>\t\n"});
  CHECK(s.result.step_ends.size() == 1 && s.result.step_ends[0] == 0);
  CHECK(s.result.queries.size() == 1 && s.result.queries[0] == "a");
  CHECK(s.result.has_answer && s.result.answer == "y" && s.result.valid_format);
  const std::vector<uint8_t> expected = {1, 0, 0, 0, 0, 1};
  CHECK(s.mask == expected);
}

void test_information_resets_open_search() {
  const Segmented s = segment_pieces({"<search>a", "<information>x</information>", "b</search>"});
  CHECK(s.result.queries.empty());
  CHECK(s.result.step_ends.empty());
}

void test_answer_rules() {
  auto answer_of = [](const std::string& text) { return segment_pieces(split_every_byte(text)).result; };
  SequenceResult r = answer_of("<answer>a<answer> b </answer>");
  CHECK(r.has_answer && r.answer == " b " && r.valid_format);
  r = answer_of("<answer>a</answer> tail");
  CHECK(r.has_answer && r.answer == "a" && !r.valid_format);
  r = answer_of("<answer>a</answer></answer>");
  CHECK(r.has_answer && r.answer == "a" && !r.valid_format);
  r = answer_of("<answer>a</answer><answer>unclosed");
  CHECK(r.has_answer && !r.valid_format);
  r = answer_of("<answer>a</answer>\xe3\x80\x80 \xc2\xa0\x1c");  // ideographic space, no-break space, FS
  CHECK(r.has_answer && r.valid_format);
  r = answer_of("<answer>a</answer>\xe3\x80");  // truncated UTF-8 decodes to U+FFFD, not whitespace
  CHECK(r.has_answer && !r.valid_format);
  r = answer_of("</answer>x<answer>");
  CHECK(!r.has_answer && !r.valid_format);
  r = answer_of("<answer> \n</answer>");  // an empty answer is an invalid format
  CHECK(r.has_answer && r.answer == " \n" && !r.valid_format);
  r = answer_of("<answer>a</answer><information><answer>doc</answer></information>");
  CHECK(r.has_answer && r.answer == "a" && !r.valid_format);  // a retrieved answer block is data
}

void test_span_rule() {
  // Tokens: 0 generated search, 1-3 inserted "\n", block, "\n"; 4 generated text that quotes an information
  // block (trained on, no step); 5 search; 6 inserted notice; 7 answer; 8 inserted span with an answer block.
  const std::vector<std::string> pieces = {"<search>q</search>", "\n", "<information>d<answer>x</answer></information>",
                                           "\n", "<information>own</information>", "<search>r</search>",
                                           "\n<information>n</information>\n", "<answer>y</answer>",
                                           "<answer>z</answer>"};
  const std::vector<int64_t> starts = {1, 6, 8};
  const std::vector<int64_t> ends = {4, 7, 9};
  InsertedSpans spans{true, starts.data(), ends.data(), 3};
  CHECK(check_spans(spans, 9) == -1);
  const Segmented s = segment_pieces(pieces, {}, spans);
  const std::vector<uint8_t> expected = {1, 0, 0, 0, 1, 1, 0, 1, 0};
  CHECK(s.mask == expected);
  CHECK(s.result.step_ends.size() == 2 && s.result.step_ends[0] == 0 && s.result.step_ends[1] == 5);
  CHECK(s.result.queries.size() == 2 && s.result.queries[1] == "r");
  CHECK(s.result.has_answer && s.result.answer == "y" && !s.result.valid_format);  // an inserted span follows
  const std::vector<int64_t> bad_starts = {0, 2};
  const std::vector<int64_t> bad_ends = {3, 4};
  CHECK(check_spans(InsertedSpans{true, bad_starts.data(), bad_ends.data(), 2}, 9) == 1);  // overlapping
  CHECK(check_spans(InsertedSpans{true, starts.data(), ends.data(), 3}, 8) == 2);  // past the end
}

void test_strip_leading_space_only_at_position_zero() {
  const Segmented first = segment_pieces({" <think>", " x"}, {1, 1});
  CHECK(first.result.num_bytes == 9);
  CHECK(first.result.tags.size() == 1 && first.result.tags[0].start_byte == 0);
  const TokenTable table({" <think>", "y"}, {1, 0});
  const std::vector<int32_t> ids = {1, 0, 0};
  std::vector<uint8_t> mask(3);
  SequenceResult result;
  Scratch scratch;
  segment_sequence(table, ids.data(), 3, InsertedSpans{}, mask.data(), result, scratch);
  CHECK(result.num_bytes == 17);
  CHECK(result.tags.size() == 2 && result.tags[0].start_byte == 2 && result.tags[0].start_token == 1);
}

void test_empty_tokens_and_sequences() {
  const Segmented empty = segment_pieces({});
  CHECK(empty.result.tags.empty() && empty.result.num_bytes == 0 && !empty.result.has_answer);
  const Segmented s = segment_pieces({"", "<inform", "", "ation>", "", "</information>", ""});
  CHECK(s.result.tags.size() == 2);
  CHECK(s.result.tags[0].start_token == 1 && s.result.tags[0].end_token == 3);
  const std::vector<uint8_t> expected = {1, 0, 0, 0, 0, 0, 1};
  CHECK(s.mask == expected);
}

void test_garbage_bytes() {
  std::string garbage;
  for (int byte = 0; byte < 256; ++byte) garbage.push_back(static_cast<char>(byte));
  const Segmented s = segment_pieces({garbage, "<answer>\xff\xfe</answer>", garbage + "<"});
  CHECK(s.result.tags.size() == 2);
  CHECK(s.result.answer == "\xff\xfe" && !s.result.valid_format);
}

void test_whitespace_and_range_helpers() {
  CHECK(is_python_whitespace(""));
  CHECK(is_python_whitespace(" \t\n\r\v\f\x1c\x1d\x1e\x1f"));
  CHECK(is_python_whitespace("\xc2\x85\xe1\x9a\x80\xe2\x80\x8a\xe2\x80\xa8\xe2\x80\xaf\xe2\x81\x9f"));
  CHECK(!is_python_whitespace("\xe2\x80\x8b"));  // zero-width space is not whitespace in Python
  CHECK(!is_python_whitespace(" x"));
  CHECK(!is_python_whitespace("\xc2"));
  const std::vector<int32_t> ids = {0, 3, 4, -1};
  CHECK(first_out_of_range(ids.data(), 2, 4) == -1);
  CHECK(first_out_of_range(ids.data(), 4, 4) == 2);
  CHECK(first_out_of_range(ids.data() + 3, 1, 4) == 0);
}

void test_table_rejects_bad_input() {
  bool threw = false;
  try {
    TokenTable({"a"}, {0, 0});
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw);
  threw = false;
  try {
    TokenTable({"a"}, {1});
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw);
}

// Tag byte ranges, steps, queries and the answer depend on the byte stream only, never on how it is split.
void test_random_splits_agree_with_byte_tokens() {
  const std::vector<std::string> fragments = {
      "<think>", "</think>", "<search>", "</search>", "<information>", "</information>", "<answer>", "</answer>",
      "<", ">", "/", "<sea", "rch>", " ", "\n", "word", "\xff", "\xe3\x80\x80", "<informat", "ion>", "</"};
  std::mt19937 rng(1234);
  for (int trial = 0; trial < 2000; ++trial) {
    std::string text;
    const int count = static_cast<int>(rng() % 30);
    for (int i = 0; i < count; ++i) text += fragments[rng() % fragments.size()];
    std::vector<std::string> pieces;
    size_t position = 0;
    while (position < text.size()) {
      const size_t take = std::min<size_t>(text.size() - position, rng() % 6);  // 0: an empty token
      pieces.push_back(text.substr(position, take));
      position += take;
    }
    const SequenceResult split = segment_pieces(pieces).result;
    const SequenceResult bytes = segment_pieces(split_every_byte(text)).result;
    CHECK(split.tags.size() == bytes.tags.size());
    for (size_t i = 0; i < split.tags.size() && i < bytes.tags.size(); ++i) {
      CHECK(split.tags[i].kind == bytes.tags[i].kind);
      CHECK(split.tags[i].start_byte == bytes.tags[i].start_byte && split.tags[i].end_byte == bytes.tags[i].end_byte);
    }
    CHECK(split.step_ends.size() == bytes.step_ends.size());
    CHECK(split.queries == bytes.queries);
    CHECK(split.has_answer == bytes.has_answer && split.answer == bytes.answer);
    CHECK(split.valid_format == bytes.valid_format);
    CHECK(split.num_bytes == static_cast<int64_t>(text.size()));
  }
}

}  // namespace

int main() {
  test_tag_split_at_every_point();
  test_near_misses_and_restart();
  test_steps_masks_and_queries();
  test_tags_inside_information_are_data();
  test_information_resets_open_search();
  test_answer_rules();
  test_span_rule();
  test_strip_leading_space_only_at_position_zero();
  test_empty_tokens_and_sequences();
  test_garbage_bytes();
  test_whitespace_and_range_helpers();
  test_table_rejects_bad_input();
  test_random_splits_agree_with_byte_tokens();
  if (failures > 0) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("segmenter C++ tests passed\n");
  return 0;
}
