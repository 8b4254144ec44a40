// pybind11 bindings of the step segmenter: `stepsearch._segmenter`.
//
// The batch entry point takes a ragged batch as flat int32 ids plus int64 offsets (sequence b is
// ids[offsets[b]:offsets[b+1]]), checks them, segments every sequence with the GIL released, and returns flat
// arrays that `stepsearch.rollout.segmenter.BatchSegmentation` wraps. Strings come back decoded as UTF-8 with
// replacement and stripped, exactly as the Python reference produces them.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "segmenter.h"

namespace py = pybind11;
using stepsearch::SequenceResult;
using stepsearch::Tag;
using stepsearch::TokenTable;

namespace {

template <typename T>
py::array_t<T> to_array(const std::vector<T>& values) {
  py::array_t<T> array(static_cast<py::ssize_t>(values.size()));
  std::copy(values.begin(), values.end(), array.mutable_data());
  return array;
}

py::str decode_stripped(const std::string& bytes) {
  PyObject* decoded = PyUnicode_DecodeUTF8(bytes.data(), static_cast<Py_ssize_t>(bytes.size()), "replace");
  if (decoded == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::str>(decoded).attr("strip")();
}

void check_offsets(const int64_t* offsets, int64_t count, int64_t num_ids) {
  if (count < 1) throw py::value_error("offsets must hold at least one entry (offsets[0] == 0)");
  if (offsets[0] != 0) throw py::value_error("offsets[0] must be 0, got " + std::to_string(offsets[0]));
  for (int64_t b = 1; b < count; ++b) {
    if (offsets[b] < offsets[b - 1]) {
      throw py::value_error("offsets must be non-decreasing: offsets[" + std::to_string(b) + "] = " +
                            std::to_string(offsets[b]) + " < offsets[" + std::to_string(b - 1) + "] = " +
                            std::to_string(offsets[b - 1]));
    }
  }
  if (offsets[count - 1] != num_ids) {
    throw py::value_error("offsets[-1] = " + std::to_string(offsets[count - 1]) + " must equal the number of ids (" +
                          std::to_string(num_ids) + ")");
  }
}

struct FlatBatch {
  std::vector<uint8_t> tag_kind;
  std::vector<int64_t> tag_start_token, tag_end_token, tag_start_byte, tag_end_byte, tag_offsets;
  std::vector<int64_t> step_ends, step_query, step_offsets;
  std::vector<std::string> queries;
  std::vector<int64_t> query_offsets;
  std::vector<std::string> answers;
  std::vector<uint8_t> has_answer;

  void append(const SequenceResult& result) {
    for (const Tag& tag : result.tags) {
      tag_kind.push_back(tag.kind);
      tag_start_token.push_back(tag.start_token);
      tag_end_token.push_back(tag.end_token);
      tag_start_byte.push_back(tag.start_byte);
      tag_end_byte.push_back(tag.end_byte);
    }
    tag_offsets.push_back(static_cast<int64_t>(tag_kind.size()));
    step_ends.insert(step_ends.end(), result.step_ends.begin(), result.step_ends.end());
    step_query.insert(step_query.end(), result.step_query.begin(), result.step_query.end());
    step_offsets.push_back(static_cast<int64_t>(step_ends.size()));
    queries.insert(queries.end(), result.queries.begin(), result.queries.end());
    query_offsets.push_back(static_cast<int64_t>(queries.size()));
    answers.push_back(result.answer);
    has_answer.push_back(result.has_answer ? 1 : 0);
  }
};

using Int64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

py::dict segment_batch(const TokenTable& table, py::array_t<int32_t, py::array::c_style> ids,
                       py::array_t<int64_t, py::array::c_style> offsets, std::optional<Int64Array> span_start,
                       std::optional<Int64Array> span_end, std::optional<Int64Array> span_offsets) {
  if (ids.ndim() != 1) throw py::value_error("ids must be a 1-D int32 array, got " + std::to_string(ids.ndim()) + "-D");
  if (offsets.ndim() != 1) {
    throw py::value_error("offsets must be a 1-D int64 array, got " + std::to_string(offsets.ndim()) + "-D");
  }
  const int64_t num_ids = ids.size();
  const int64_t num_sequences = offsets.size() - 1;
  const int32_t* id_data = ids.data();
  const int64_t* offset_data = offsets.data();
  check_offsets(offset_data, offsets.size(), num_ids);
  const bool spans_given = span_start.has_value();
  if (spans_given != span_end.has_value() || spans_given != span_offsets.has_value()) {
    throw py::value_error("span_start, span_end and span_offsets are given together or not at all");
  }
  const int64_t* start_data = nullptr;
  const int64_t* end_data = nullptr;
  const int64_t* span_offset_data = nullptr;
  if (spans_given) {
    if (span_offsets->size() != offsets.size()) {
      throw py::value_error("span_offsets must hold one entry per sequence plus one");
    }
    check_offsets(span_offsets->data(), span_offsets->size(), span_start->size());
    if (span_end->size() != span_start->size()) throw py::value_error("span_start and span_end differ in length");
    start_data = span_start->data();
    end_data = span_end->data();
    span_offset_data = span_offsets->data();
    for (int64_t b = 0; b < num_sequences; ++b) {
      const stepsearch::InsertedSpans spans{true, start_data + span_offset_data[b], end_data + span_offset_data[b],
                                            span_offset_data[b + 1] - span_offset_data[b]};
      const int64_t bad = stepsearch::check_spans(spans, offset_data[b + 1] - offset_data[b]);
      if (bad >= 0) {
        throw py::value_error("inserted span " + std::to_string(bad) + " of sequence " + std::to_string(b) +
                              " must be non-empty, sorted, disjoint and inside the sequence");
      }
    }
  }

  py::array_t<uint8_t> loss_mask(static_cast<py::ssize_t>(num_ids));
  py::array_t<bool> valid_format(static_cast<py::ssize_t>(num_sequences));
  py::array_t<int64_t> num_bytes(static_cast<py::ssize_t>(num_sequences));
  uint8_t* mask_data = loss_mask.mutable_data();
  bool* valid_data = valid_format.mutable_data();
  int64_t* bytes_data = num_bytes.mutable_data();
  FlatBatch flat;
  int64_t bad_index = -1;
  {
    py::gil_scoped_release release;
    bad_index = stepsearch::first_out_of_range(id_data, num_ids, table.size());
    if (bad_index < 0) {
      flat.tag_offsets.push_back(0);
      flat.step_offsets.push_back(0);
      flat.query_offsets.push_back(0);
      SequenceResult result;
      stepsearch::Scratch scratch;
      for (int64_t b = 0; b < num_sequences; ++b) {
        const int64_t begin = offset_data[b];
        stepsearch::InsertedSpans spans;
        if (spans_given) {
          spans = stepsearch::InsertedSpans{true, start_data + span_offset_data[b], end_data + span_offset_data[b],
                                            span_offset_data[b + 1] - span_offset_data[b]};
        }
        stepsearch::segment_sequence(table, id_data + begin, offset_data[b + 1] - begin, spans, mask_data + begin,
                                     result, scratch);
        valid_data[b] = result.valid_format;
        bytes_data[b] = result.num_bytes;
        flat.append(result);
      }
    }
  }
  if (bad_index >= 0) {
    const int64_t sequence =
        std::upper_bound(offset_data, offset_data + num_sequences + 1, bad_index) - offset_data - 1;
    throw py::value_error("token id " + std::to_string(id_data[bad_index]) + " at index " +
                          std::to_string(bad_index - offset_data[sequence]) + " of sequence " +
                          std::to_string(sequence) + " (flat index " + std::to_string(bad_index) +
                          ") is outside the token table of " + std::to_string(table.size()) + " ids");
  }

  py::list queries(flat.queries.size());
  for (size_t i = 0; i < flat.queries.size(); ++i) queries[i] = decode_stripped(flat.queries[i]);
  py::list answers(flat.answers.size());
  for (size_t i = 0; i < flat.answers.size(); ++i) {
    answers[i] = flat.has_answer[i] ? py::object(decode_stripped(flat.answers[i])) : py::object(py::none());
  }
  py::dict out;
  out["loss_mask"] = loss_mask;
  out["valid_format"] = valid_format;
  out["num_bytes"] = num_bytes;
  out["tag_kind"] = to_array(flat.tag_kind);
  out["tag_start_token"] = to_array(flat.tag_start_token);
  out["tag_end_token"] = to_array(flat.tag_end_token);
  out["tag_start_byte"] = to_array(flat.tag_start_byte);
  out["tag_end_byte"] = to_array(flat.tag_end_byte);
  out["tag_offsets"] = to_array(flat.tag_offsets);
  out["step_ends"] = to_array(flat.step_ends);
  out["step_query"] = to_array(flat.step_query);
  out["step_offsets"] = to_array(flat.step_offsets);
  out["queries"] = queries;
  out["query_offsets"] = to_array(flat.query_offsets);
  out["answers"] = answers;
  return out;
}

}  // namespace

PYBIND11_MODULE(_segmenter, m) {
  m.doc() = "C++ step segmenter: agent tags, step ends and loss masks from token ids "
            "(see stepsearch.rollout.segmenter)";

  py::list names;
  for (const char* name : stepsearch::kTagNames) names.append(name);
  m.attr("TAG_NAMES") = py::tuple(names);

  py::class_<TokenTable>(m, "TokenTable")
      .def(py::init([](const std::vector<py::bytes>& token_bytes, const std::vector<bool>& strip_leading_space) {
             std::vector<std::string> bytes(token_bytes.begin(), token_bytes.end());
             std::vector<uint8_t> strips(strip_leading_space.begin(), strip_leading_space.end());
             try {
               return TokenTable(bytes, strips);
             } catch (const std::invalid_argument& error) {
               throw py::value_error(error.what());
             }
           }),
           py::arg("token_bytes"), py::arg("strip_leading_space"),
           "Token id -> bytes table; a flagged token drops its leading space at position 0 of a sequence.")
      .def("__len__", &TokenTable::size);

  m.def("segment_batch", &segment_batch, py::arg("table"), py::arg("ids"), py::arg("offsets"),
        py::arg("span_start") = py::none(), py::arg("span_end") = py::none(), py::arg("span_offsets") = py::none(),
        "Segment the ragged batch ids[offsets[b]:offsets[b+1]] (int32 ids, int64 offsets), with the inserted token "
        "spans [span_start[k], span_end[k]) of sequence b at k in span_offsets[b]:span_offsets[b+1] when given "
        "(span rule) or without them (text rule); returns flat arrays.");
}
