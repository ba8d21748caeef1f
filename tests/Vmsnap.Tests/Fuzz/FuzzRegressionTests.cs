using System.Text;
using Vmsnap.Fuzz;
using Vmsnap.Migration;
using Vmsnap.Qcow2;
using Vmsnap.Tests.Interop;
using Vmsnap.Tests.Migration;
using Vmsnap.Tests.Qcow2;
using static Vmsnap.Tests.Migration.StreamFiles;

namespace Vmsnap.Tests.Fuzz;

/// <summary>
/// What the fuzzers (fuzz/run.sh) found, as the smallest inputs that show it: each must now end in one of
/// the project's own errors, through the parser and through the same fuzzing target that found it.
/// </summary>
public sealed class FuzzRegressionTests
{
    /// <summary>A minimal stream (configuration, one RAM block, no pages) ending with <paramref name="description"/>.</summary>
    private static byte[] StreamWithDescription(byte[] description) =>
        [.. new StreamBuilder()
            .Header().Configuration("none")
            .Start(2).BlockList(("ram0", 4096)).EndOfRecords().Footer(2)
            .End(2).ZeroRecord(0, "ram0").EndOfRecords().Footer(2)
            .U8(0x00).U8(0x06).Be32((uint)description.Length).Raw(description)
            .ToArray()];

    [Fact]
    public void A_vm_description_that_is_not_utf8_is_a_stream_error()
    {
        // Found by the stream target: a string of the JSON holding a byte that is not UTF-8 (0x80) passed
        // JsonDocument.Parse and threw InvalidOperationException when the device name was read out.
        byte[] json = [.. "{\"page_size\": 4096, \"devices\": [{\"name\": \""u8, 0x80, .. "\", \"instance_id\": 0}]}"u8];
        byte[] stream = StreamWithDescription(json);

        var e = Assert.Throws<MigrationStreamException>(() => ReadBytes(stream, r => MigrationStream.Inspect(r)));
        Assert.Contains("VM description", e.Message);
        Assert.Contains("UTF-8", e.Message);
        using (var scratch = new TempDir())
            Assert.IsType<MigrationStreamException>(FuzzTargets.Run("stream", stream, scratch.Path));

        // The same stream with a valid name is read.
        byte[] good = StreamWithDescription(Encoding.UTF8.GetBytes("{\"page_size\": 4096, \"devices\": [{\"name\": \"é\", \"instance_id\": 0}]}"));
        Assert.Equal("é", Assert.Single(ReadBytes(good, r => MigrationStream.Inspect(r)).Devices).Name);
    }
}
