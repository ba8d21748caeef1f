using System.Reflection;
using System.Text.RegularExpressions;
using Vmsnap.Migration;
using Vmsnap.Qcow2;
using Vmsnap.Snapshots;
using Vmsnap.Storage;
using Vmsnap.Tests.Interop;
using Vmsnap.Tests.Snapshots;

namespace Vmsnap.Tests.Api;

/// <summary>
/// docs/api.md's example is this file's code (a test compares them), and it works: QEMU restores the
/// snapshot it saves and qemu-img finds the image clean. docs/api.md's list of public types is the
/// library's exported surface, and each failure a caller may want to tell apart has its own type.
/// </summary>
[Trait("Category", "Unit")]
public sealed partial class ApiExampleTests
{
    private const long RamBytes = 16 << 20;

    /// <summary>The example of docs/api.md, between the markers; nothing else may sit between them.</summary>
    private static void Example(string imagePath, string ramFile, string restoredFile)
    {
        // docs/api.md example: begin
        // Save: a machine of type "none" whose one RAM block, "ram0", is in a file; no device state.
        using (MachineProfile machine = MachineProfile.Create("none", [new("ram0", ramFile)]))
        {
            VmSnapshotResult saved = VmSnapshots.Save(imagePath, "before-upgrade", machine);
            Console.WriteLine($"saved {saved.VmStateBytes} bytes of VM state as snapshot ID {saved.Snapshot.Id}");
        }
        // QEMU restores it: qemu-system-x86_64 -machine none ... -drive file=IMAGE,... -loadvm before-upgrade

        // Load: the snapshot's RAM back into a file (block names and lengths are checked).
        VmSnapshotResult loaded = VmSnapshots.Load(imagePath, "before-upgrade", [new("ram0", restoredFile)]);
        Console.WriteLine($"loaded {loaded.RamBytes} bytes of RAM in {loaded.Seconds:0.000} s");

        // Every error is a VmsnapException; the specific types say what went wrong.
        try
        {
            VmSnapshots.Load(imagePath, "after-upgrade", [new("ram0", restoredFile)]);
        }
        catch (SnapshotNotFoundException e)
        {
            Console.WriteLine($"{e.Image} has no snapshot '{e.IdOrName}'");
        }
        catch (ImageInUseException e)
        {
            Console.WriteLine($"a running QEMU holds the image: {e.Message}");
        }
        // docs/api.md example: end
    }

    [QemuFact]
    public void The_example_saves_a_snapshot_QEMU_restores_and_loads_it_back()
    {
        using var dir = new TempDir();
        string image = VmKit.QemuImage(dir);
        string ram = dir.File("ram"), restored = dir.File("restored"), byQemu = dir.File("by-qemu");
        GuestRam.Create(ram, RamBytes, seed: 12);

        Example(image, ram, restored);

        Assert.True(File.ReadAllBytes(ram).AsSpan().SequenceEqual(File.ReadAllBytes(restored)), "the loaded RAM differs from the saved RAM");
        var snapshots = VmKit.QemuSnapshots(image);
        Assert.Equal(["before-upgrade"], snapshots.Keys);
        Assert.True(snapshots["before-upgrade"].VmStateSize > 0, "qemu-img sees no VM state in the snapshot");
        QemuImgCheck.AssertClean(image);

        VmKit.EmptyRam(dir, "by-qemu", RamBytes);
        VmKit.QemuLoadvm(QemuVm.MachineNone(byQemu, RamBytes), image, "before-upgrade");
        Assert.True(File.ReadAllBytes(ram).AsSpan().SequenceEqual(File.ReadAllBytes(byQemu)), "QEMU's -loadvm restored other RAM");
    }

    [Fact]
    public void The_example_in_docs_api_md_is_the_tested_code()
    {
        string root = LayeringTests.RepositoryRoot();
        string doc = File.ReadAllText(Path.Combine(root, "docs", "api.md"));
        Match block = CSharpBlock().Match(doc);
        Assert.True(block.Success, "docs/api.md has no ```csharp block");
        string[] documented = Lines(block.Groups[1].Value).Where(l => !UsingDirective().IsMatch(l)).ToArray();

        string source = File.ReadAllText(Path.Combine(root, "tests", "Vmsnap.Tests", "Api", "ApiExampleTests.cs"));
        int begin = source.IndexOf("// docs/api.md example: begin", StringComparison.Ordinal);
        int end = source.IndexOf("// docs/api.md example: end", StringComparison.Ordinal);
        string[] tested = Lines(source[(source.IndexOf('\n', begin) + 1)..end]);
        Assert.Equal(tested, documented);
    }

    [Fact]
    public void The_public_types_are_those_docs_api_md_lists()
    {
        string doc = File.ReadAllText(Path.Combine(LayeringTests.RepositoryRoot(), "docs", "api.md"));
        var documented = ListedType().Matches(doc).Select(m => m.Groups[1].Value).Order(StringComparer.Ordinal).ToList();
        var exported = typeof(VmsnapException).Assembly.GetExportedTypes().Select(t => t.FullName!).Order(StringComparer.Ordinal).ToList();
        Assert.Equal(exported, documented);
    }

    [Fact]
    public void Every_public_exception_is_a_VmsnapException_a_caller_cannot_throw_bare()
    {
        Type[] exceptions = typeof(VmsnapException).Assembly.GetExportedTypes().Where(t => typeof(Exception).IsAssignableFrom(t)).ToArray();
        Assert.All(exceptions, t => Assert.True(typeof(VmsnapException).IsAssignableFrom(t), $"{t} does not derive from VmsnapException"));
        Assert.True(typeof(VmsnapException).IsAbstract);
        Assert.All(exceptions.Where(t => t != typeof(VmsnapException)), t => Assert.True(t.IsSealed, $"{t} is not sealed"));
        Assert.Empty(typeof(VmsnapException).GetConstructors(BindingFlags.Public | BindingFlags.Instance));
    }

    [QemuFact]
    public void Each_kind_of_failure_has_its_own_exception_type()
    {
        using var dir = new TempDir();
        string image = VmKit.QemuImage(dir);
        string ram = dir.File("ram");
        GuestRam.Create(ram, 1 << 20, seed: 3);
        using (var machine = MachineProfile.Create("none", [new("ram0", ram)]))
        {
            VmSnapshots.Save(image, "a", machine);
            SnapshotExistsException taken = Assert.Throws<SnapshotExistsException>(() => VmSnapshots.Save(image, "a", machine));
            Assert.Equal(("a", "1", image), (taken.Name, taken.ExistingId, taken.Image));
        }
        SnapshotNotFoundException missing = Assert.Throws<SnapshotNotFoundException>(() => VmSnapshots.Load(image, "b", [new("ram0", dir.File("out"))]));
        Assert.Equal(("b", image), (missing.IdOrName, missing.Image));

        using (Qcow2Image img = Qcow2Image.Open(image))
        {
            img.CreateSnapshot("disk-only");
            Assert.Throws<ImageInUseException>(() => Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true }));
        }
        Assert.Contains("disk-only", Assert.Throws<OperationRefusedException>(() => VmSnapshots.Load(image, "disk-only", [new("ram0", dir.File("out"))])).Message);
        using (Qcow2Image readOnly = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true }))
            Assert.Throws<OperationRefusedException>(() => readOnly.CreateSnapshot("c"));

        string notQcow2 = dir.File("v99.qcow2");
        File.WriteAllBytes(notQcow2, [0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 99, .. new byte[504]]);
        Qcow2FormatException format = Assert.Throws<Qcow2FormatException>(() => Qcow2Image.Open(notQcow2, new Qcow2OpenOptions { ReadOnly = true }));
        Assert.Equal(4, format.FileOffset);

        string notStream = dir.File("stream");
        File.WriteAllBytes(notStream, [0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 2, 0xff]);
        MigrationStreamException stream = Assert.Throws<MigrationStreamException>(() => VmSnapshots.InspectStream(notStream));
        Assert.True(stream.Offset >= 4, $"no stream offset in: {stream.Message}");

        Assert.Throws<StorageException>(() => Qcow2Image.Open(dir.File("absent.qcow2")));
    }

    private static string[] Lines(string text) =>
        text.Split('\n').Select(l => l.Trim()).Where(l => l.Length > 0).ToArray();

    [GeneratedRegex(@"```csharp\n(.*?)```", RegexOptions.Singleline)]
    private static partial Regex CSharpBlock();

    [GeneratedRegex(@"^using [A-Za-z.]+;$")]
    private static partial Regex UsingDirective();

    /// <summary>A bullet of docs/api.md's type list: <c>- `Vmsnap.Namespace.Type`</c>.</summary>
    [GeneratedRegex(@"^- `(Vmsnap\.[A-Za-z0-9.+]+)`", RegexOptions.Multiline)]
    private static partial Regex ListedType();
}
